"""Core data model: validation, plan construction and application, budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokens

import mmtok
from mmtok.core import Budget, RowPlan, TokenPlan, VisualTokens, merge_tokens, segment_counts


def test_visual_tokens_accepts_2d_and_fills_defaults():
    t = VisualTokens(torch.randn(5, 3), cls_attn=torch.rand(5))
    assert t.features.shape == (1, 5, 3) and t.cls_attn.shape == (1, 5)
    assert t.lengths.tolist() == [5]
    assert t.row(0).size_weights().tolist() == [1.0] * 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=torch.empty(1, 0, 4)), "empty"),
        (dict(features=torch.randn(4)), r"\[B, N, C\]"),
        (dict(features=torch.tensor([[[float("nan"), 1.0]]])), "NaN"),
        (dict(features=torch.randn(1, 4, 2), cls_attn=torch.rand(1, 5)), "cls_attn must have shape"),
        (dict(features=torch.randn(1, 4, 2), grid=(3, 3)), "holds 9 tokens"),
        (dict(features=torch.randn(2, 4, 2), mask=torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])), "prefix"),
        (dict(features=torch.randn(1, 4, 2), sizes=torch.zeros(1, 4)), "positive"),
        (dict(features=torch.randn(1, 4, 2), segments=[[3, 2]]), "summing"),
        (dict(features=torch.randn(1, 4, 2), signals={"x": torch.rand(1, 3)}), "signals"),
    ],
)
def test_visual_tokens_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisualTokens(**kwargs)


def test_integer_features_are_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        VisualTokens(torch.ones(1, 3, 2, dtype=torch.long))


def test_plan_from_rows_sorts_and_remaps_assign():
    # row 0: keep tokens 3 and 1; tokens 0 and 2 merge into token 3, token 4 is dropped
    rows = [
        RowPlan(torch.tensor([3, 1]), torch.tensor([0, 1, 0, 0, -1])),
        RowPlan(torch.tensor([2, 0])),
    ]
    plan = TokenPlan.from_rows(rows, num_input=5)
    assert plan.keep.tolist() == [[1, 3], [0, 2]]
    assert plan.assign.tolist() == [[1, 0, 1, 1, -1], [0, -1, 1, -1, -1]]
    assert plan.sizes.tolist() == [[1.0, 3.0], [1.0, 1.0]]
    assert plan.merging
    x = torch.arange(10.0).reshape(2, 5, 1)
    out = plan.apply(x)
    assert out[0, :, 0].tolist() == pytest.approx([1.0, (0 + 2 + 3) / 3])
    assert out[1, :, 0].tolist() == [5.0, 7.0]
    assert plan.apply(x, reduce="gather")[0, :, 0].tolist() == [1.0, 3.0]
    assert plan.apply(x, reduce="sum")[0, :, 0].tolist() == [1.0, 5.0]


def test_plan_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="twice"):
        TokenPlan.from_rows([RowPlan(torch.tensor([1, 1]))], 3)
    with pytest.raises(ValueError, match="own slot"):
        TokenPlan.from_rows([RowPlan(torch.tensor([0, 2]), torch.tensor([1, 1, 1]))], 3)
    with pytest.raises(ValueError, match=">= N"):
        TokenPlan.from_rows([RowPlan(torch.tensor([5]))], 3)


def test_apply_uses_source_sizes_as_merge_weights_and_keeps_dtype():
    sizes = torch.tensor([[1.0, 3.0, 1.0]])
    plan = TokenPlan.from_rows([RowPlan(torch.tensor([0]), torch.tensor([0, 0, -1]))], 3, sizes)
    x = torch.tensor([[[0.0], [4.0], [100.0]]], dtype=torch.bfloat16)
    out = plan.apply(x)
    assert out.dtype == torch.bfloat16
    assert out.item() == 3.0  # (1*0 + 3*4) / 4
    assert plan.sizes.tolist() == [[4.0]]


def test_ragged_plan_pads_with_zero_and_masks():
    plan = TokenPlan.from_rows([RowPlan(torch.tensor([0, 1, 2])), RowPlan(torch.tensor([1]))], 4)
    assert plan.counts.tolist() == [3, 1]
    assert plan.mask.tolist() == [[True] * 3, [True, False, False]]
    out = plan.apply(torch.ones(2, 4, 2))
    assert out[1, 1:].abs().sum() == 0


def test_merge_tokens_reference_known_answer():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    means, sizes = merge_tokens(x, torch.tensor([[1, 1, -1]]), torch.tensor([[1.0, 3.0, 1.0]]), 3)
    assert means[0, 1].tolist() == [2.5, 1.5]
    assert sizes.tolist() == [[0.0, 4.0, 0.0]]
    assert means[0, 0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("value, n, want", [(0.25, 576, 144), (1.0, 10, 10), (0.01, 10, 1), (64, 576, 64)])
def test_budget_counts(value, n, want):
    t = VisualTokens(torch.randn(1, n, 2))
    assert segment_counts(value, t) == [[(n, want)]]


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, float("nan")])
def test_budget_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        segment_counts(bad, VisualTokens(torch.randn(1, 4, 2)))


def test_budget_type_errors():
    with pytest.raises(TypeError):
        segment_counts("64", VisualTokens(torch.randn(1, 4, 2)))
    with pytest.raises(TypeError):
        segment_counts(True, VisualTokens(torch.randn(1, 4, 2)))


def test_budget_larger_than_tokens_names_both():
    with pytest.raises(ValueError, match="larger than the 4 tokens"):
        segment_counts(5, VisualTokens(torch.randn(1, 4, 2)))


def test_per_frame_budget_uses_grid_frames():
    t = make_tokens(b=1, t=3, h=2, w=2)
    assert segment_counts(Budget(2, per="frame"), t) == [[(4, 2)] * 3]
    with pytest.raises(ValueError, match="per='frame'"):
        segment_counts(Budget(2, per="frame"), make_tokens(b=1))


def test_adaptive_budget_follows_importance_and_is_exact():
    feats = torch.randn(1, 12, 4)
    imp = torch.tensor([[9.0] * 4 + [1.0] * 4 + [0.0] * 4])
    t = VisualTokens(feats, segments=[[4, 4, 4]], signals={"importance": imp})
    counts = segment_counts(Budget(2, per="crop", allocation="adaptive"), t)[0]
    ks = [k for _, k in counts]
    assert sum(ks) == 6 and ks[0] >= ks[1] >= ks[2] >= 1
    assert ks[0] == 4  # capped at the segment size, the rest flows on
    with pytest.raises(ValueError, match="importance"):
        segment_counts(
            Budget(2, per="crop", allocation="adaptive"), VisualTokens(feats, segments=[[4, 4, 4]])
        )


def test_budget_options_are_validated():
    with pytest.raises(ValueError, match="per"):
        Budget(4, per="pixel")
    with pytest.raises(ValueError, match="adaptive"):
        Budget(4, allocation="adaptive")


def test_registry_errors_list_what_is_valid():
    with pytest.raises(ValueError, match="valid names: .*identity"):
        mmtok.create_compressor("nope")
    with pytest.raises(ValueError, match="valid options: .*seed"):
        mmtok.create_compressor("random", sead=1)
    with pytest.raises(ValueError, match="stage must be"):
        mmtok.list_compressors(stage="gpu")
    assert "random" in mmtok.list_compressors(modality="audio")
