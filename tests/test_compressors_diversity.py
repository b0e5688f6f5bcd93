"""Known answers of the diversity / coverage compressors (divprune, cdpruner, coverage, dart) on hand-made tokens."""

from __future__ import annotations

import itertools

import pytest
import torch

import mmtok
from mmtok.compressors.cdpruner import greedy_dpp_map
from mmtok.core import VisualTokens

E = torch.eye(4)


def _vec(*coefs: float) -> torch.Tensor:
    return torch.tensor(coefs + (0.0,) * (4 - len(coefs)), dtype=torch.float32)


def _keep(name: str, tokens: VisualTokens, k: int, **options) -> list[int]:
    return mmtok.create_compressor(name, **options)(tokens, k).row_keep(0).tolist()


def _clusters(seed: int = 0, sizes=(4, 3, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around e1, e2, e3, shuffled; returns features [n, 4] and cluster ids [n]."""
    g = torch.Generator().manual_seed(seed)
    feats, ids = [], []
    for c, s in enumerate(sizes):
        feats.append(E[c] + 0.02 * torch.randn(s, 4, generator=g))
        ids += [c] * s
    perm = torch.randperm(sum(sizes), generator=g)
    return torch.cat(feats)[perm], torch.tensor(ids)[perm]


# ---------------------------------------------------------------- divprune


def test_divprune_keeps_one_token_per_tight_cluster():
    feats, ids = _clusters()
    keep = _keep("divprune", VisualTokens(feats), 3)
    assert sorted(ids[keep].tolist()) == [0, 1, 2]


def test_divprune_measures_distance_on_the_metric():
    metric, ids = _clusters(seed=1)
    feats = torch.randn(metric.shape[0], 8, generator=torch.Generator().manual_seed(5))
    keep = _keep("divprune", VisualTokens(feats, metric=metric), 3)
    assert sorted(ids[keep].tolist()) == [0, 1, 2]


def test_divprune_starts_from_the_most_isolated_token_then_farthest():
    # token 3 is alone; tokens 0-2 nearly coincide; token 4 leans towards them
    feats = torch.stack([_vec(1, 0.01), _vec(1, 0.02), _vec(1, 0.03), _vec(0, 0, 1), _vec(1, 0, 0.5)])
    assert _keep("divprune", VisualTokens(feats), 1) == [3]
    assert _keep("divprune", VisualTokens(feats), 2) == [0, 3]


# ---------------------------------------------------------------- cdpruner


def _cdp_tokens(text: torch.Tensor, feats: torch.Tensor | None = None, **kw) -> VisualTokens:
    if feats is None:
        feats = torch.stack([E[0], E[1], E[2]])
    return VisualTokens(feats, text=text.reshape(1, -1, 4), **kw)


def test_cdpruner_prefers_a_diverse_token_over_a_duplicate():
    # tokens 0 and 1 are the same direction and the most relevant; 2 is less relevant but new; 3 is irrelevant
    feats = torch.stack([E[0], E[0], E[1], E[2]])
    keep = _keep("cdpruner", _cdp_tokens(_vec(2, 1), feats), 2)
    assert keep == [0, 2]


def test_cdpruner_breaks_equal_diversity_by_instruction_relevance():
    # e2 and e3 are equally far from the first pick e1; the text decides which one is kept
    assert _keep("cdpruner", _cdp_tokens(_vec(2, 1, 0)), 2) == [0, 1]
    assert _keep("cdpruner", _cdp_tokens(_vec(2, 0, 1)), 2) == [0, 2]


def test_cdpruner_theta_zero_ignores_the_instruction():
    a = _keep("cdpruner", _cdp_tokens(_vec(2, 1, 0)), 2, theta=0.0)
    b = _keep("cdpruner", _cdp_tokens(_vec(2, 0, 1)), 2, theta=0.0)
    assert a == b


def test_cdpruner_honours_text_mask():
    # the padded second text token points at e3 and would flip the choice if it were used
    text = torch.stack([_vec(2, 1, 0), _vec(0, 0, 50)]).unsqueeze(0)
    masked = VisualTokens(torch.stack([E[0], E[1], E[2]]), text=text, text_mask=torch.tensor([[True, False]]))
    assert _keep("cdpruner", masked, 2) == [0, 1]
    unmasked = VisualTokens(torch.stack([E[0], E[1], E[2]]), text=text)
    assert _keep("cdpruner", unmasked, 2) == [0, 2]


def _naive_greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    chosen: list[int] = []
    for _ in range(k):
        best, arg = -float("inf"), -1
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            val = torch.linalg.slogdet(kernel[idx][:, idx])
            score = val.logabsdet.item() if val.sign > 0 else -float("inf")
            if score > best:
                best, arg = score, j
        chosen.append(arg)
    return chosen


def test_cdpruner_greedy_dpp_map_matches_naive_log_det_greedy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 12, generator=g, dtype=torch.float64)
    r = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    kernel = r[:, None] * (x @ x.T) * r[None, :]
    assert greedy_dpp_map(kernel, 6).tolist() == _naive_greedy_logdet(kernel, 6)


def test_cdpruner_is_the_greedy_map_of_the_conditional_kernel():
    # 6-d features for 10 tokens, k=3: an input where the relevance weighting and theta both change the answer
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    text = torch.randn(3, 6, generator=g, dtype=torch.float64)
    xn = x / x.norm(dim=1, keepdim=True)
    rel = (xn @ (text / text.norm(dim=1, keepdim=True)).T).mean(1)
    rel = (rel - rel.min()) / (rel.max() - rel.min())
    kernel = rel[:, None] * (xn @ xn.T) * rel[None, :]
    want = sorted(_naive_greedy_logdet(kernel, 3))
    assert _keep("cdpruner", VisualTokens(x.float(), text=text.float().unsqueeze(0)), 3) == want
    assert want != sorted(_naive_greedy_logdet(xn @ xn.T, 3))  # relevance matters here
    # theta: r -> exp(alpha r), alpha = theta / (2 (1 - theta)) = 2 for theta = 0.8
    e = torch.exp(2.0 * rel)
    want_theta = sorted(_naive_greedy_logdet(e[:, None] * (xn @ xn.T) * e[None, :], 3))
    assert _keep("cdpruner", VisualTokens(x.float(), text=text.float().unsqueeze(0)), 3, theta=0.8) == want_theta
    assert want != want_theta


def test_cdpruner_greedy_dpp_map_restart_conditions_on_the_new_round_only():
    # round 1 keeps 0 and 1 (rank 2). Round 2 starts at 2 (diag 4); 3 is then nearly a duplicate of 2
    # (gain 0.01) while 4 is new to this round (gain 2.25), so 4 comes next, not 3 (the next diagonal)
    x = torch.tensor([[3.0, 0], [0, 3], [2, 0], [1.9, 0.1], [0, 1.5]])
    assert greedy_dpp_map(x @ x.T, 4).tolist() == [0, 1, 2, 4]


def test_cdpruner_greedy_dpp_map_is_exact_past_the_kernel_rank():
    # rank-2 kernel over 6 items: Alg. 1 alone stops after 2 picks (4: diag 10, then 5: gain 2.5).
    # A restart over {0, 1, 2, 3} picks 2 (diag 2) then 3 (gain 1.125 > 0.5); the next restart 0 (tie with 1)
    x = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -0.5], [3, 1], [1, 2]])
    assert greedy_dpp_map(x @ x.T, 5).tolist() == [4, 5, 2, 3, 0]


def test_cdpruner_bad_theta():
    with pytest.raises(ValueError, match="theta"):
        mmtok.create_compressor("cdpruner", theta=1.0)


# ---------------------------------------------------------------- coverage


def _coverage_tokens(text: torch.Tensor) -> tuple[VisualTokens, torch.Tensor]:
    """Query pair {0, 1} along e4, cluster A (4 tokens) along e1, cluster B (3 tokens) along e2."""
    g = torch.Generator().manual_seed(3)
    q = E[3] + 0.01 * torch.randn(2, 4, generator=g)
    a = E[0] + 0.01 * torch.randn(4, 4, generator=g)
    b = E[1] + 0.01 * torch.randn(3, 4, generator=g)
    ids = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2])
    return VisualTokens(torch.cat([q, a, b]), text=text.reshape(1, -1, 4)), ids


def test_coverage_covers_the_query_first_then_the_uncovered_clusters():
    tokens, ids = _coverage_tokens(E[3])
    assert ids[_keep("coverage", tokens, 1)].tolist() == [0]
    assert sorted(ids[_keep("coverage", tokens, 3)].tolist()) == [0, 1, 2]


def test_coverage_follows_the_text():
    tokens, ids = _coverage_tokens(E[1])
    assert ids[_keep("coverage", tokens, 1)].tolist() == [2]


def _naive_coverage(x, text, k, alpha, tt, tv):
    """Greedy on f(S) = mean_t max_{j in S} P[t, j] + alpha mean_i max_{j in S} Q[i, j], re-evaluated per set."""
    p = (torch.cosine_similarity(text[:, None], x[None], dim=-1) / tt).softmax(dim=1)
    q = (torch.cosine_similarity(x[:, None], x[None], dim=-1) / tv).softmax(dim=1)

    def f(sel: list[int]) -> float:
        return float(p[:, sel].max(dim=1).values.mean() + alpha * q[:, sel].max(dim=1).values.mean())

    chosen: list[int] = []
    for _ in range(k):
        gains = [(f(chosen + [j]), -j) for j in range(len(x)) if j not in chosen]
        chosen.append(-max(gains)[1])
    return sorted(chosen)


def _random_instance() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g), torch.randn(2, 4, generator=g)


@pytest.mark.parametrize("alpha, tt, tv", [(0.0, 0.1, 0.3), (0.5, 0.02, 0.2), (0.5, 0.5, 0.5), (1.0, 0.5, 0.5), (12.0, 0.5, 0.5)])
def test_coverage_is_the_greedy_maximiser_of_the_mmtok_objective(alpha, tt, tv):
    x, text = _random_instance()
    tokens = VisualTokens(x, text=text.unsqueeze(0))
    opts = dict(alpha=alpha, text_temperature=tt, vision_temperature=tv)
    assert _keep("coverage", tokens, 7, **opts) == _naive_coverage(x, text, 7, alpha, tt, tv)


def test_coverage_weighting_and_temperatures_change_the_answer():
    # the known-answer test above pins alpha, the 1/n weight and both temperatures only if each matters here
    x, text = _random_instance()
    tokens = VisualTokens(x, text=text.unsqueeze(0))
    answers = [
        _keep("coverage", tokens, 3, alpha=a, text_temperature=tt, vision_temperature=tv)
        for a, tt, tv in [(1.0, 0.5, 0.5), (12.0, 0.5, 0.5), (1.0, 0.02, 0.5), (1.0, 0.5, 0.2)]
    ]
    assert all(answers[0] != other for other in answers[1:])


def test_coverage_averages_over_text_tokens():
    # P is divided by the number of text tokens: repeating every text token changes nothing, whereas
    # giving the text twice the weight (alpha halved) does change the answer on this input
    x, text = _random_instance()
    opts = dict(text_temperature=0.5, vision_temperature=0.5)
    once = _keep("coverage", VisualTokens(x, text=text.unsqueeze(0)), 3, alpha=0.5, **opts)
    twice = _keep("coverage", VisualTokens(x, text=text.repeat_interleave(2, 0).unsqueeze(0)), 3, alpha=0.5, **opts)
    assert once == twice
    assert once != _keep("coverage", VisualTokens(x, text=text.unsqueeze(0)), 3, alpha=0.25, **opts)


def test_coverage_bad_options():
    with pytest.raises(ValueError, match="temperature"):
        mmtok.create_compressor("coverage", text_temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        mmtok.create_compressor("coverage", alpha=-1.0)


# ---------------------------------------------------------------- dart


def test_dart_keeps_the_largest_norm_pivot_then_the_least_duplicated_token():
    # token 1 has the largest norm; token 3 duplicates it; token 0 is orthogonal to it
    feats = torch.stack([_vec(0, 1), 3 * _vec(1, 0.1), _vec(0.7, 0.7), 2 * _vec(1, 0.1)])
    keep = _keep("dart", VisualTokens(feats), 2, pivots=1, text_pivots=0)
    assert keep == [0, 1]
    assert 3 not in _keep("dart", VisualTokens(feats), 3, pivots=1, text_pivots=0)


def test_dart_default_pivots_are_the_largest_l1_norms():
    # L1 and L2 rank token 0 and token 1 differently: |(1,1,1,1)|_1 = 4 > |(3,0,0,0)|_1 = 3
    feats = torch.stack([_vec(1, 1, 1, 1), _vec(3), _vec(0.1, 0.1), _vec(0.2)])
    assert _keep("dart", VisualTokens(feats), 1) == [0]
    assert _keep("dart", VisualTokens(feats), 1, norm_p=2.0) == [1]


def test_dart_pivots_from_keys_signal_when_given():
    feats = torch.stack([_vec(5), _vec(0, 1), _vec(0, 0, 1), _vec(0, 0, 0, 1)])
    keys = torch.tensor([[1.0], [1.0], [9.0], [1.0]])
    tokens = VisualTokens(feats, signals={"keys": keys})
    assert _keep("dart", tokens, 1) == [2]


def _dart_pair_tokens() -> VisualTokens:
    feats = torch.stack(
        [
            3 * E[0],  # 0: pivot 1
            2 * E[1],  # 1: pivot 2
            _vec(0.05, 1, 0.01),  # 2: duplicate of pivot 2
            _vec(0.05, 1, -0.01),  # 3: duplicate of pivot 2
            _vec(0, 0, 1),  # 4: new
            _vec(1, 0, 0.1),  # 5: duplicate of pivot 1
            _vec(1, 0, 0.3),  # 6: near pivot 1
        ]
    )
    return VisualTokens(feats * torch.tensor([1, 1, 0.1, 0.1, 0.1, 0.1, 0.1]).unsqueeze(1))


def test_dart_per_pivot_each_pivot_keeps_its_least_duplicated_tokens():
    # k=6, 2 pivots: share 3. Pivot 0 keeps 4, 2, 3 (least like e1); pivot 1 keeps one of 5, 6 (tie: 5)
    assert _keep("dart", _dart_pair_tokens(), 6, pivots=2, text_pivots=0) == [0, 1, 2, 3, 4, 5]


def test_dart_global_keeps_the_tokens_least_duplicated_with_any_pivot():
    # largest duplication with either pivot: 4 -> 0, 6 -> 0.958, 5 -> 0.995, 2 = 3 -> 0.9987 (tie: 2)
    keep = _keep("dart", _dart_pair_tokens(), 6, pivots=2, text_pivots=0, selection="global")
    assert keep == [0, 1, 2, 4, 5, 6]


def test_dart_text_pivot_selects_tokens_unlike_the_text():
    # one vision pivot (token 0, along e1) and one text pivot (along e2); k=5 gives each round(5/2) = 2
    feats = torch.stack(
        [3 * E[0], _vec(0, 0.2), _vec(0, 0, 0.2), _vec(0.1, 0, 0, 0.2), _vec(0.1, 0.2), _vec(0.2, 0, 0.01)]
    )
    text = E[1].reshape(1, 1, 4)
    with_text = _keep("dart", VisualTokens(feats, text=text), 5, pivots=1, text_pivots=1)
    without = _keep("dart", VisualTokens(feats), 5, pivots=1, text_pivots=1)
    assert with_text == [0, 1, 2, 3, 5]  # pivot: 1, 2 (cos 0 to e1); text pivot: 3, 5 (cos 0 to e2)
    assert without == [0, 1, 2, 3, 4]  # the pivot alone: its 4 least duplicated tokens


def test_dart_global_uses_the_largest_duplication_with_any_pivot():
    # token 2 copies pivot 0 (max 1.0, mean 0.5); token 3 is half-way (max = mean = 0.707): 3 is kept
    feats = torch.stack([3 * E[0], 2 * E[1], 0.1 * E[0], 0.1 * _vec(1, 1)])
    assert _keep("dart", VisualTokens(feats), 3, pivots=2, text_pivots=0, selection="global") == [0, 1, 3]


def test_dart_duplication_on_the_metric_text_on_the_features():
    # features say token 1 is new, the metric (3-d) says it duplicates the pivot: the metric wins
    feats = torch.stack([3 * E[0], 0.1 * E[1], 0.1 * E[2]])
    metric = torch.tensor([[1.0, 0, 0], [1, 0, 0.01], [0, 1, 0]])
    keep = _keep("dart", VisualTokens(feats, metric=metric, text=E[3].reshape(1, 1, 4)), 2, pivots=1)
    assert keep == [0, 2]


def test_dart_bad_options():
    with pytest.raises(ValueError, match="pivots"):
        mmtok.create_compressor("dart", pivots=0)
    with pytest.raises(ValueError, match="selection"):
        mmtok.create_compressor("dart", selection="max")


# ---------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["cdpruner", "coverage"])
def test_text_methods_name_the_missing_text(name):
    bare = VisualTokens(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="text"):
        mmtok.create_compressor(name)(bare, 3)
    row = bare.row(0)
    with pytest.raises(ValueError, match="text"):
        mmtok.create_compressor(name).plan_row(row, 3, torch.Generator())


@pytest.mark.parametrize("name", ["divprune", "cdpruner", "coverage", "dart"])
def test_per_row_answers_do_not_depend_on_batch_neighbours(name):
    feats, _ = _clusters(seed=4, sizes=(3, 3, 3))
    text = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(2))
    alone = mmtok.create_compressor(name)(VisualTokens(feats, text=text), 4).row_keep(0)
    other = torch.randn(9, 4, generator=torch.Generator().manual_seed(9))
    batch = VisualTokens(
        torch.stack([other, feats]),
        text=torch.cat([torch.randn(1, 2, 4), text]),
        mask=torch.tensor([[True] * 5 + [False] * 4, [True] * 9]),
    )
    assert torch.equal(mmtok.create_compressor(name)(batch, 4).row_keep(1), alone)


@pytest.mark.parametrize("name, options", [("cdpruner", {}), ("coverage", {"alpha": 50.0})])
def test_text_methods_measure_diversity_on_the_metric_and_relevance_on_the_features(name, options):
    # 3-d metric in three tight clusters, unrelated 4-d features and text (a different width on purpose)
    metric, ids = _clusters(seed=6)
    metric = metric[:, :3]
    g = torch.Generator().manual_seed(8)
    tokens = VisualTokens(torch.randn(12, 4, generator=g), metric=metric, text=torch.randn(1, 3, 4, generator=g))
    assert sorted(ids[_keep(name, tokens, 3, **options)].tolist()) == [0, 1, 2]


def test_divprune_cdpruner_coverage_dart_keep_k_distinct_duplicates():
    # every token identical: diversity methods must still keep exactly k distinct tokens
    tokens = VisualTokens(torch.ones(1, 6, 4), text=torch.ones(1, 2, 4))
    for name, k in itertools.product(["divprune", "cdpruner", "coverage", "dart"], [1, 3, 5]):
        keep = _keep(name, tokens, k)
        assert len(set(keep)) == k, name
