"""Known-answer tests of the merging compressors: tome, pitome, dymu."""

from __future__ import annotations

import math

import pytest
import torch

import mmtok
from mmtok.compressors.dymu import calibrate_threshold
from mmtok.compressors.pitome import energy_scores
from mmtok.compressors.tome import MergeGroups


def _groups(plan: mmtok.TokenPlan, b: int = 0) -> list[list[int]]:
    """Members of each output slot of row ``b``, slots in order."""
    a = plan.assign[b]
    return [(a == j).nonzero().flatten().tolist() for j in range(int(plan.counts[b]))]


def _one_hot(n: int, c: int) -> torch.Tensor:
    return torch.eye(c)[:n].clone()


# ---------------------------------------------------------------- tome


def test_tome_merges_the_near_identical_pair_into_its_size_weighted_mean():
    x = _one_hot(8, 8)
    x[5] = x[2] + 0.01 * torch.arange(8.0) / 8  # token 2 (set A) and token 5 (set B) nearly equal
    sizes = torch.tensor([1.0, 1, 3, 1, 1, 1, 1, 1])
    tokens = mmtok.VisualTokens(x, sizes=sizes)
    plan = mmtok.create_compressor("tome")(tokens, 7)
    assert plan.keep[0].tolist() == [0, 1, 3, 4, 5, 6, 7]  # the destination (B token) represents the pair
    slot = plan.keep[0].tolist().index(5)
    assert _groups(plan)[slot] == [2, 5]
    assert all(len(g) == 1 for j, g in enumerate(_groups(plan)) if j != slot)
    out = plan.apply(tokens.features)
    torch.testing.assert_close(out[0, slot], (3 * x[2] + x[5]) / 4)
    assert plan.sizes[0, slot].item() == 4.0


def test_tome_uses_the_metric_when_given():
    x = _one_hot(6, 6)
    metric = _one_hot(6, 6)
    metric[3] = metric[0]  # only the metric says tokens 0 and 3 are alike
    plan = mmtok.create_compressor("tome")(mmtok.VisualTokens(x, metric=metric), 5)
    assert [0, 3] in _groups(plan)


def test_tome_sizes_accumulate_through_rounds():
    x = torch.ones(4, 3)
    plan = mmtok.create_compressor("tome")(mmtok.VisualTokens(x, sizes=torch.tensor([1.0, 2, 3, 4])), 1)
    # round 1: 0 -> 1 and 2 -> 1 (ties go to the first B token); round 2: {0, 1, 2} -> 3
    assert plan.keep[0].tolist() == [3]
    assert plan.sizes[0].tolist() == [10.0]
    # a second pass over merged tokens carries their sizes on
    first = mmtok.create_compressor("tome")(mmtok.VisualTokens(torch.ones(4, 3)), 2)
    assert _groups(first) == [[0, 1, 2], [3]] and first.sizes[0].tolist() == [3.0, 1.0]
    merged = mmtok.VisualTokens(first.apply(torch.ones(1, 4, 3)), sizes=first.sizes)
    second = mmtok.create_compressor("tome")(merged, 1)
    assert second.sizes[0].tolist() == [4.0]


def test_merge_groups_track_members_sizes_and_weighted_metrics():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])
    row = mmtok.VisualTokens(m, sizes=torch.tensor([3.0, 1.0, 1.0, 2.0])).row(0)
    g = MergeGroups.start(row)
    g.merge(torch.tensor([0]), torch.tensor([1]))
    assert g.assign.tolist() == [0, 0, 1, 2] and g.rep.tolist() == [1, 2, 3]
    torch.testing.assert_close(g.metric[0], torch.tensor([0.75, 0.25]))  # (3 * m0 + 1 * m1) / 4
    assert g.size.tolist() == [4.0, 1.0, 2.0]
    g.merge(torch.tensor([0, 1]), torch.tensor([2, 2]))  # groups can pile into one destination
    assert g.assign.tolist() == [0, 0, 0, 0] and g.rep.tolist() == [3]
    torch.testing.assert_close(g.metric[0], (3 * m[0] + m[1] + m[2] + 2 * m[3]) / 7)
    assert g.plan().keep.tolist() == [3]


def test_tome_never_merges_a_protected_token():
    x = _one_hot(6, 6)
    x[1] = x[0]  # token 1 duplicates token 0
    unprotected = mmtok.create_compressor("tome")(mmtok.VisualTokens(x), 5)
    assert [0, 1] in _groups(unprotected)
    for k in (5, 3, 2):
        plan = mmtok.create_compressor("tome", protected=1)(mmtok.VisualTokens(x), k)
        assert plan.counts.item() == k
        assert [0] in _groups(plan), f"k={k}: protected token 0 was merged"


def test_tome_protected_needs_room_in_the_budget():
    with pytest.raises(ValueError, match="budget"):
        mmtok.create_compressor("tome", protected=2)(mmtok.VisualTokens(torch.randn(6, 4)), 2)
    with pytest.raises(ValueError, match="protected"):
        mmtok.create_compressor("tome", protected=-1)


def test_tome_step_fraction_controls_rounds():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    full = mmtok.create_compressor("tome")(mmtok.VisualTokens(x), 8)
    slow = mmtok.create_compressor("tome", step_fraction=0.05)(mmtok.VisualTokens(x), 8)
    assert full.counts.item() == slow.counts.item() == 8
    with pytest.raises(ValueError, match="step_fraction"):
        mmtok.create_compressor("tome", step_fraction=0.75)


# ---------------------------------------------------------------- pitome


def _cluster_and_isolated(seed: int = 0) -> torch.Tensor:
    """Ten tokens: 1, 3, 5, 7, 8, 9 are a dense cluster around e0; 0, 2, 4, 6 are isolated (e1..e4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(10, 16)
    cluster = [1, 3, 5, 7, 8, 9]
    for i in cluster:
        x[i, 0] = 1.0
        x[i, 10:] = 0.05 * torch.randn(6, generator=g)
    for j, i in enumerate([0, 2, 4, 6]):
        x[i, 1 + j] = 1.0
    return x


def test_energy_is_high_in_a_cluster_and_low_for_isolated_tokens():
    x = _cluster_and_isolated()
    e = energy_scores(x, margin=0.5)
    assert e[[1, 3, 5, 7, 8, 9]].min() > e[[0, 2, 4, 6]].max()
    # isolated one-hot token: itself (1.0) plus nine neighbours at cosine ~0 below the margin
    want = (1.0 + 9 * torch.expm1(torch.tensor(-0.5))) / 10
    torch.testing.assert_close(e[0], want, atol=2e-3, rtol=0)


def test_pitome_merges_inside_the_cluster_and_protects_isolated_tokens():
    x = _cluster_and_isolated()
    for k in (8, 5):
        plan = mmtok.create_compressor("pitome")(mmtok.VisualTokens(x), k)
        groups = _groups(plan)
        assert plan.counts.item() == k
        for i in (0, 2, 4, 6):
            assert [i] in groups, f"k={k}: isolated token {i} was merged"
    assert [1, 3, 5, 7, 8, 9] in groups  # at k=5 the whole cluster is one token
    # ToMe's alternating split puts them in set A, and its first round merges all of A at this budget
    tome = mmtok.create_compressor("tome")(mmtok.VisualTokens(x), 5)
    assert not any([i] in _groups(tome) for i in (0, 2, 4, 6))


def _pitome_reference(x: torch.Tensor, k: int, step_fraction: float = 0.1, margin: float = 0.5) -> list[list[int]]:
    """PiToMe rounds recomputing every similarity from scratch; groups as (destination, members)."""
    groups = [(i, [i]) for i in range(x.shape[0])]
    while len(groups) > k:
        xn = torch.nn.functional.normalize(torch.stack([x[m].mean(0) for _, m in groups]), dim=-1)
        sim = xn @ xn.T
        n = len(groups)
        r = min(max(1, math.ceil(step_fraction * n)), n // 2, n - k)
        energy = torch.where(sim >= margin, sim, torch.expm1(sim - margin)).mean(1)
        cand = torch.sort(energy, descending=True, stable=True).indices[: 2 * r].tolist()
        a, b = cand[0::2], cand[1::2]
        for i in a:
            j = b[int(sim[i, b].argmax())]
            groups[j] = (groups[j][0], groups[j][1] + groups[i][1])
        groups = [g for i, g in enumerate(groups) if i not in a]
    return [sorted(m) for _, m in groups]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pitome_matches_a_from_scratch_reference(seed):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(seed))
    plan = mmtok.create_compressor("pitome")(mmtok.VisualTokens(x), 9)
    assert _groups(plan) == _pitome_reference(x, 9)


def test_pitome_options_are_validated():
    with pytest.raises(ValueError, match="margin"):
        mmtok.create_compressor("pitome", margin=1.5)
    with pytest.raises(ValueError, match="alpha"):
        mmtok.create_compressor("pitome", alpha=0.0)


# ---------------------------------------------------------------- dymu


def _simple_and_complex() -> mmtok.VisualTokens:
    """Row 0: a 4x4 'image' of two repeated tokens (halves u / v); row 1: 16 distinct tokens."""
    simple = torch.zeros(16, 16)
    simple[:8, 0] = 1.0
    simple[8:, 1] = 1.0
    complex_ = torch.eye(16)
    return mmtok.VisualTokens(torch.stack([simple, complex_]), grid=(4, 4))


def test_dymu_keeps_fewer_tokens_for_a_simple_image():
    tokens = _simple_and_complex()
    plan = mmtok.create_compressor("dymu", threshold=0.9)(tokens, 12)
    assert plan.counts.tolist() == [2, 12]  # duplicates collapse to u and v; distinct tokens hit the ceiling
    assert sorted(_groups(plan, 0)) == [list(range(8)), list(range(8, 16))]
    assert plan.sizes[0, :2].tolist() == [8.0, 8.0]


def test_dymu_never_exceeds_the_budget():
    tokens = _simple_and_complex()
    for k in (1, 2, 5, 15):
        plan = mmtok.create_compressor("dymu", threshold=0.9)(tokens, k)
        assert plan.counts.tolist() == [min(2, k), k]
    everything = mmtok.create_compressor("dymu", threshold=-1.0)(tokens, 12)
    assert everything.counts.tolist() == [1, 1]  # every edge is above -1: all merge


def test_dymu_protected_and_options():
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0  # all identical
    plan = mmtok.create_compressor("dymu", protected=1)(mmtok.VisualTokens(x), 4)
    assert plan.counts.item() == 2 and [0] in _groups(plan)
    with pytest.raises(ValueError, match="threshold"):
        mmtok.create_compressor("dymu", threshold=float("nan"))


def test_calibrate_threshold_is_the_batch_mean_of_the_rth_largest_edge():
    def image(cos_a: float, cos_b: float) -> torch.Tensor:
        # tokens 0, 2 form set A and 1, 3 set B; the edges are 0-1 (cos_a) and 2-3 (cos_b)
        x = torch.zeros(4, 4)
        x[0, 0] = 1.0
        x[1, 0], x[1, 1] = cos_a, (1 - cos_a**2) ** 0.5
        x[2, 2] = 1.0
        x[3, 2], x[3, 3] = cos_b, (1 - cos_b**2) ** 0.5
        return x

    batch = torch.stack([image(0.9, 0.5), image(0.7, 0.3)])
    assert calibrate_threshold(batch, 1) == pytest.approx(0.8, abs=1e-5)
    assert calibrate_threshold(batch, 2) == pytest.approx(0.4, abs=1e-5)
    # with tau between the two edges of image 0, one thresholded round merges exactly r = 1 there
    tau = calibrate_threshold(batch[:1], 1) - 0.1
    plan = mmtok.create_compressor("dymu", threshold=tau)(mmtok.VisualTokens(batch[:1]), 3)
    assert _groups(plan) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="too large"):
        calibrate_threshold(batch, 3)
