"""Known answers on hand-made inputs for uniform, pool, cls_attn, visionzip, vispruner and hiprune."""

from __future__ import annotations

import pytest
import torch

import mmtok
from mmtok.compressors.hiprune import grid_neighbours
from mmtok.compressors.uniform import grid_windows
from mmtok.compressors.vispruner import remove_duplicates


def _keep(name: str, tokens: mmtok.VisualTokens, budget, **options) -> list[int]:
    return mmtok.create_compressor(name, **options)(tokens, budget).row_keep(0).tolist()


def _onehot(dims: list[int], width: int) -> torch.Tensor:
    """``[len(dims), width]`` rows that are basis vectors (orthogonal unless equal)."""
    return torch.eye(width)[dims]


# ---------------------------------------------------------------- uniform


def test_uniform_strided_on_4x4():
    tokens = mmtok.VisualTokens(torch.randn(16, 3), grid=(4, 4))
    assert _keep("uniform", tokens, 4) == [0, 2, 8, 10]


def test_uniform_24x24_to_64_keeps_cell_centres():
    tokens = mmtok.VisualTokens(torch.randn(576, 2), grid=(24, 24))
    keep = torch.tensor(_keep("uniform", tokens, 64))
    axis = list(range(1, 24, 3))
    assert sorted(set((keep // 24).tolist())) == axis and sorted(set((keep % 24).tolist())) == axis
    assert keep.numel() == 64


def test_uniform_budget_that_does_not_factor():
    tokens = mmtok.VisualTokens(torch.randn(36, 2), grid=(6, 6))
    keep = torch.tensor(_keep("uniform", tokens, 17))
    assert keep.numel() == 17
    # four bands of rows (bounds 0, 1, 3, 4, 6) holding 4, 4, 5, 4 tokens
    assert torch.bincount(keep // 6, minlength=6).tolist() == [4, 4, 0, 5, 4, 0]


def test_uniform_without_grid_is_evenly_spaced():
    tokens = mmtok.VisualTokens(torch.randn(10, 2))
    assert _keep("uniform", tokens, 3) == [1, 4, 7]
    assert _keep("uniform", tokens, 5) == [0, 2, 4, 6, 8]


def test_uniform_per_frame():
    tokens = mmtok.VisualTokens(torch.randn(48, 2), grid=(3, 4, 4))
    keep = _keep("uniform", tokens, mmtok.Budget(4, per="frame"))
    assert keep == [f * 16 + i for f in range(3) for i in (0, 2, 8, 10)]


def test_grid_windows_rejects_bad_k_and_grid():
    with pytest.raises(ValueError, match="k must be"):
        grid_windows(4, 5, None)
    with pytest.raises(ValueError, match="holds 9 tokens"):
        grid_windows(8, 2, (3, 3))


# ---------------------------------------------------------------- pool


def test_pool_4x4_to_4_averages_quadrants_exactly():
    x = torch.arange(16.0).reshape(1, 16, 1) * torch.tensor([1.0, -2.0])
    tokens = mmtok.VisualTokens(x, grid=(4, 4))
    plan = mmtok.create_compressor("pool")(tokens, 4)
    quadrants = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    want = torch.stack([x[0, q].mean(0) for q in quadrants])
    assert torch.equal(plan.apply(x)[0], want)
    assert plan.sizes[0].tolist() == [4.0] * 4
    assert plan.assign[0].reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_pool_uneven_grid_covers_every_token():
    x = torch.randn(1, 36, 4)
    plan = mmtok.create_compressor("pool")(mmtok.VisualTokens(x, grid=(6, 6)), 17)
    assert plan.counts.tolist() == [17]
    assert bool((plan.assign >= 0).all()) and float(plan.sizes.sum()) == 36.0
    assert sorted(plan.sizes[0].tolist())[0] >= 1.0


def test_pool_without_grid_is_1d_pooling():
    x = torch.arange(10.0).reshape(1, 10, 1)
    plan = mmtok.create_compressor("pool")(mmtok.VisualTokens(x), 3)
    assert plan.apply(x)[0, :, 0].tolist() == pytest.approx([1.0, 4.0, 7.5])
    assert plan.keep[0].tolist() == [1, 4, 7]


def test_pool_weights_by_token_sizes():
    x = torch.tensor([[[0.0], [3.0], [10.0], [20.0]]])
    sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    plan = mmtok.create_compressor("pool")(mmtok.VisualTokens(x, sizes=sizes), 2)
    assert plan.apply(x)[0, :, 0].tolist() == pytest.approx([2.0, 15.0])
    assert plan.sizes[0].tolist() == [3.0, 2.0]


# ---------------------------------------------------------------- cls_attn


def test_cls_attn_keeps_top_attended():
    attn = torch.tensor([0.05, 0.30, 0.01, 0.20, 0.09, 0.25, 0.10])
    tokens = mmtok.VisualTokens(torch.randn(7, 3), cls_attn=attn)
    assert _keep("cls_attn", tokens, 3) == [1, 3, 5]


def test_cls_attn_ties_go_to_lower_index():
    attn = torch.tensor([0.1, 0.4, 0.2, 0.4, 0.2, 0.4])
    tokens = mmtok.VisualTokens(torch.randn(6, 3), cls_attn=attn)
    assert _keep("cls_attn", tokens, 2) == [1, 3]
    assert _keep("cls_attn", tokens, 4) == [1, 2, 3, 5]


def test_cls_attn_per_row_in_a_ragged_batch():
    attn = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.7, 0.1, 0.9, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    tokens = mmtok.VisualTokens(torch.randn(2, 4, 3), cls_attn=attn, mask=mask)
    plan = mmtok.create_compressor("cls_attn")(tokens, 2)
    assert plan.keep.tolist() == [[1, 3], [0, 2]]


# ---------------------------------------------------------------- visionzip


def _visionzip_tokens() -> mmtok.VisualTokens:
    # 12 tokens; CLS attention peaks at 2 and 7 (dominant). Remaining (raster order):
    # [0, 1, 3, 4, 5, 6, 8, 9, 10, 11] -> with 2 contextual slots the step is 5: targets 0 and 6.
    dims = [0, 0, 5, 0, 1, 0, 1, 6, 1, 1, 0, 1]
    feats = _onehot(dims, 8) + 0.01 * torch.arange(12.0).unsqueeze(1)
    attn = torch.full((12,), 0.01)
    attn[2], attn[7] = 0.5, 0.4
    return mmtok.VisualTokens(feats, cls_attn=attn)


def test_visionzip_keeps_dominant_and_merges_into_targets():
    tokens = _visionzip_tokens()
    plan = mmtok.create_compressor("visionzip", contextual_ratio=0.5)(tokens, 4)
    assert plan.keep[0].tolist() == [0, 2, 6, 7]
    # slot of each input: dominant 2 -> 1, 7 -> 3; target 0 gathers the dim-0 tokens, 6 the dim-1 ones
    assert plan.assign[0].tolist() == [0, 0, 1, 0, 2, 0, 2, 3, 2, 2, 0, 2]
    out = plan.apply(tokens.features)[0]
    f = tokens.features[0]
    assert torch.equal(out[1], f[2]) and torch.equal(out[3], f[7])
    assert torch.allclose(out[0], f[[0, 1, 3, 5, 10]].mean(0))
    assert torch.allclose(out[2], f[[4, 6, 8, 9, 11]].mean(0))
    assert float(plan.sizes.sum()) == 12.0


def test_visionzip_matches_on_metric_not_features():
    tokens = _visionzip_tokens()
    metric = tokens.features.clone()
    metric[0, 3] = metric[0, 6]  # token 3 looks like target 6 in the metric only
    t = mmtok.VisualTokens(tokens.features, cls_attn=tokens.cls_attn, metric=metric)
    plan = mmtok.create_compressor("visionzip", contextual_ratio=0.5)(t, 4)
    assert plan.assign[0, 3].item() == 2


def test_visionzip_default_split_is_54_plus_10():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(1, 576, generator=g)
    tokens = mmtok.VisualTokens(torch.randn(1, 576, 8, generator=g), cls_attn=attn, grid=(24, 24))
    plan = mmtok.create_compressor("visionzip")(tokens, 64)
    top = torch.argsort(attn[0], descending=True)[:54]
    slots = plan.assign[0, top]
    assert bool((plan.sizes[0, slots] == 1).all()), "dominant tokens stay unmerged"
    assert int((plan.sizes[0] > 1).sum()) == 10 and float(plan.sizes.sum()) == 576.0


def test_visionzip_budget_one_merges_everything():
    tokens = _visionzip_tokens()
    plan = mmtok.create_compressor("visionzip")(tokens, 1)
    assert plan.keep[0].tolist() == [0] and plan.assign[0].tolist() == [0] * 12


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.1, "half", True])
def test_visionzip_bad_ratio(ratio):
    with pytest.raises(ValueError, match="contextual_ratio"):
        mmtok.create_compressor("visionzip", contextual_ratio=ratio)


# ---------------------------------------------------------------- vispruner


def test_vispruner_drops_duplicates_before_distinct_tokens():
    # tokens 0/1 and 2/3 are duplicate pairs, 4..7 are distinct; attention falls with the index
    feats = _onehot([0, 0, 1, 1, 2, 3, 4, 5], 8)
    attn = torch.linspace(0.9, 0.2, 8)
    tokens = mmtok.VisualTokens(feats, cls_attn=attn)
    keep = _keep("vispruner", tokens, 6, important_ratio=0.0)
    assert keep == [1, 3, 4, 5, 6, 7]
    assert _keep("cls_attn", tokens, 6) == [0, 1, 2, 3, 4, 5]


def test_vispruner_important_tokens_survive_even_if_duplicates():
    feats = _onehot([0, 0, 1, 1, 2, 3, 4, 5], 8)
    attn = torch.linspace(0.9, 0.2, 8)
    tokens = mmtok.VisualTokens(feats, cls_attn=attn)
    keep = _keep("vispruner", tokens, 6)  # 3 important (0, 1, 2), 3 diverse from [3, ..., 7]
    assert keep[:3] == [0, 1, 2] and len(keep) == 6
    assert _keep("vispruner", tokens, 4, important_ratio=1.0) == [0, 1, 2, 3]


def test_remove_duplicates_one_per_round():
    feats = _onehot([0, 1, 2, 2, 3, 4], 8)  # token 2 duplicates token 3
    order = torch.arange(6)
    # a = [0, 2, 4], b = [1, 3, 5]: token 2 matches token 3 exactly and goes; a's survivors, then b
    assert remove_duplicates(feats, order, 5, 1).tolist() == [0, 4, 1, 3, 5]


def test_remove_duplicates_cached_and_per_round_paths_agree(monkeypatch):
    import mmtok.compressors.vispruner as vp

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(60, 8, generator=g)
    order = torch.randperm(60, generator=g)[:50]
    cached = remove_duplicates(feats, order, 7, 3)
    monkeypatch.setattr(vp, "_CACHE_LIMIT", 0)
    assert torch.equal(remove_duplicates(feats, order, 7, 3), cached)
    assert cached.numel() == 7 and cached.unique().numel() == 7


@pytest.mark.parametrize("options", [dict(important_ratio=1.2), dict(important_ratio=-0.5), dict(step=0)])
def test_vispruner_bad_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        mmtok.create_compressor("vispruner", **options)


# ---------------------------------------------------------------- hiprune


def _hiprune_tokens(anchor: int, registers: tuple[int, ...] = (0, 24)) -> mmtok.VisualTokens:
    mid = torch.full((25,), 0.01)
    mid[anchor] = 1.0
    attn = torch.full((25,), 0.02)
    attn[anchor] = 0.9  # already chosen as anchor: must not be counted twice
    for i, r in enumerate(registers):
        attn[r] = 0.5 - 0.1 * i
    return mmtok.VisualTokens(torch.randn(25, 4), grid=(5, 5), cls_attn=attn, signals={"mid_attn": mid})


def test_hiprune_keeps_anchor_and_its_4_neighbours():
    assert _keep("hiprune", _hiprune_tokens(12), 5, alpha=1.0) == [7, 11, 12, 13, 17]


def test_hiprune_keeps_anchor_and_its_8_neighbours():
    keep = _keep("hiprune", _hiprune_tokens(12), 9, alpha=1.0, connectivity=8)
    assert keep == [6, 7, 8, 11, 12, 13, 16, 17, 18]


def test_hiprune_fills_the_rest_with_registers():
    # 7 tokens: 1 anchor (round(7 / 5)) + 4 buffers + 2 registers by output-layer attention
    assert _keep("hiprune", _hiprune_tokens(12), 7, alpha=1.0) == [0, 7, 11, 12, 13, 17, 24]


def test_hiprune_neighbours_do_not_wrap_rows():
    # anchor 5 is row 1, column 0: its neighbours are 0, 6 and 10 (not 4, the end of row 0)
    keep = _keep("hiprune", _hiprune_tokens(5, registers=(24, 23)), 5, alpha=1.0)
    assert keep == [0, 5, 6, 10, 24]


def test_hiprune_truncates_buffers_by_mid_attention():
    # k = 3: 1 anchor, only 2 of its 4 neighbours fit: those with the highest middle-layer attention
    tokens = _hiprune_tokens(12)
    mid = tokens.signals["mid_attn"].clone()
    mid[0, 11], mid[0, 17] = 0.5, 0.4
    t = mmtok.VisualTokens(tokens.features, grid=(5, 5), cls_attn=tokens.cls_attn, signals={"mid_attn": mid})
    assert _keep("hiprune", t, 3, alpha=1.0) == [11, 12, 17]


def test_hiprune_default_alpha_small_budget_is_register_only():
    tokens = _hiprune_tokens(12)
    assert _keep("hiprune", tokens, 3) == _keep("cls_attn", tokens, 3)


def test_grid_neighbours_stay_in_their_frame():
    assert grid_neighbours(torch.tensor([9]), (2, 3, 3)).tolist() == [10, 12]
    assert grid_neighbours(torch.tensor([4]), (3, 3), 8).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


def test_hiprune_needs_a_grid_per_segment():
    tokens = _hiprune_tokens(12)
    t = mmtok.VisualTokens(
        tokens.features,
        grid=(5, 5),
        cls_attn=tokens.cls_attn,
        signals=dict(tokens.signals),
        segments=[[10, 15]],
    )
    with pytest.raises(ValueError, match="grid"):
        mmtok.create_compressor("hiprune")(t, mmtok.Budget(3, per="crop"))


def test_hiprune_names_missing_mid_attn():
    tokens = mmtok.VisualTokens(torch.randn(25, 4), grid=(5, 5), cls_attn=torch.rand(25))
    with pytest.raises(ValueError, match="mid_attn"):
        mmtok.create_compressor("hiprune")(tokens, 5)


def test_hiprune_rejects_multichannel_mid_attn():
    tokens = mmtok.VisualTokens(
        torch.randn(25, 4), grid=(5, 5), cls_attn=torch.rand(25), signals={"mid_attn": torch.rand(25, 2)}
    )
    with pytest.raises(ValueError, match="mid_attn"):
        mmtok.create_compressor("hiprune")(tokens, 5)


@pytest.mark.parametrize("options", [dict(alpha=1.5), dict(alpha=-0.1), dict(connectivity=6)])
def test_hiprune_bad_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        mmtok.create_compressor("hiprune", **options)


@pytest.mark.parametrize("name", ["cls_attn", "visionzip", "vispruner", "hiprune"])
def test_attention_methods_name_missing_cls_attn(name):
    tokens = mmtok.VisualTokens(torch.randn(25, 4), grid=(5, 5), signals={"mid_attn": torch.rand(25)})
    with pytest.raises(ValueError, match="cls_attn"):
        mmtok.create_compressor(name)(tokens, 5)
