"""The contract every registered compressor keeps, checked at several budgets and batch shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tokens

import mmtok
from mmtok.compressors import compressor_class

NAMES = mmtok.list_compressors()
# Methods that merge every input token into some output (none dropped): their output sizes sum to N.
MERGE_ALL = {"tome", "pitome", "dymu", "pool", "visionzip"}


def _check_plan(name: str, tokens: mmtok.VisualTokens, plan: mmtok.TokenPlan, want: list[int]) -> None:
    cls = compressor_class(name)
    lengths = tokens.lengths.tolist()
    counts = plan.counts.tolist()
    for b, (got, k, n) in enumerate(zip(counts, want, lengths, strict=True)):
        if not cls.honours_budget:
            assert got == n
        elif cls.adaptive:
            assert 1 <= got <= k, f"{name}: row {b} kept {got} > ceiling {k}"
        else:
            assert got == k, f"{name}: row {b} kept {got}, budget {k}"
        keep = plan.keep[b, :got]
        assert bool((keep[1:] > keep[:-1]).all()), f"{name}: keep not ascending and unique"
        assert int(keep.max()) < n, f"{name}: keeps a padding token"
        assign = plan.assign[b]
        assert assign[keep].tolist() == list(range(got)), f"{name}: assign inconsistent with keep"
        assert int(assign.max()) < got and int(assign.min()) >= -1
        assert bool((assign[n:] == -1).all()), f"{name}: padding tokens assigned"
        used = set(assign[:n][assign[:n] >= 0].tolist())
        assert used == set(range(got)), f"{name}: an output slot has no input"
        total = float(plan.sizes[b].sum())
        if name in MERGE_ALL:
            assert total == pytest.approx(float(plan.source_sizes[b, :n].sum())), (
                f"{name}: sizes do not sum to N"
            )
        else:
            assert total == pytest.approx(float((plan.source_sizes[b] * (assign >= 0)).sum()))


def _want(budget, lengths):
    return [budget if isinstance(budget, int) else max(1, int(budget * n + 0.5)) for n in lengths]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1, 5, 17, 35, 0.5, 0.1])
def test_exact_budget_full_batch(name, budget):
    tokens = make_tokens(b=2, h=6, w=6)
    plan = mmtok.create_compressor(name)(tokens, budget)
    _check_plan(name, tokens, plan, _want(budget, [36, 36]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [3, 16, 0.25])
def test_exact_budget_ragged_batch(name, budget):
    tokens = make_tokens(b=3, h=6, w=6, lengths=[36, 16, 25])
    plan = mmtok.create_compressor(name)(tokens, budget)
    _check_plan(name, tokens, plan, _want(budget, [36, 16, 25]))


@pytest.mark.parametrize("name", NAMES)
def test_per_frame_budget_keeps_tokens_in_every_frame(name):
    tokens = make_tokens(b=1, t=3, h=4, w=4)
    plan = mmtok.create_compressor(name)(tokens, mmtok.Budget(3, per="frame"))
    keep = plan.row_keep(0)
    frames = torch.bincount(keep // 16, minlength=3).tolist()
    cls = compressor_class(name)
    if not cls.honours_budget:
        assert frames == [16, 16, 16]
    elif cls.adaptive:
        assert all(1 <= f <= 3 for f in frames)
    else:
        assert frames == [3, 3, 3]
    # no token is merged across frames
    a = plan.assign[0]
    for j in range(plan.counts.item()):
        members = (a == j).nonzero().flatten() // 16
        assert members.unique().numel() == 1


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_full_budget(name):
    tokens = make_tokens(b=2, h=5, w=5)
    x = tokens.features
    for budget in (25, 1.0):
        plan = mmtok.create_compressor(name)(tokens, budget)
        assert plan.keep.tolist() == [list(range(25))] * 2
        assert not plan.merging
        assert torch.equal(plan.apply(x), x)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name):
    tokens = make_tokens(b=2, h=6, w=6)
    a = mmtok.create_compressor(name, seed=3)(tokens, 9)
    b = mmtok.create_compressor(name, seed=3)(tokens, 9)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.assign, b.assign)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_preserved(name, dtype):
    tokens = make_tokens(b=2, h=6, w=6, dtype=dtype)
    plan = mmtok.create_compressor(name)(tokens, 10)
    out = plan.apply(tokens.features)
    assert out.dtype == dtype and out.device == tokens.features.device
    assert plan.keep.device == tokens.features.device
    assert bool(torch.isfinite(out.float()).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_device_preserved_on_cuda(name):
    t = make_tokens(b=2, h=6, w=6)
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    moved = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    moved["signals"] = {k: v.cuda() for k, v in t.signals.items()}
    tokens = mmtok.VisualTokens(**moved)
    plan = mmtok.create_compressor(name)(tokens, 10)
    assert plan.keep.is_cuda and plan.apply(tokens.features).is_cuda


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [0, 37, -1, 0.0, 1.01])
def test_bad_budget_is_a_value_error(name, budget):
    with pytest.raises(ValueError, match="budget"):
        mmtok.create_compressor(name)(make_tokens(b=1, h=6, w=6), budget)


@pytest.mark.parametrize("name", NAMES)
def test_not_visual_tokens_is_a_type_error(name):
    with pytest.raises(TypeError, match="VisualTokens"):
        mmtok.create_compressor(name)(torch.randn(1, 4, 2), 2)


@pytest.mark.parametrize("name", [n for n in NAMES if compressor_class(n).requires])
def test_missing_signal_is_named(name):
    cls = compressor_class(name)
    full = make_tokens(b=1, h=6, w=6)
    bare = mmtok.VisualTokens(full.features)
    with pytest.raises(ValueError, match=sorted(cls.requires)[0]):
        cls()(bare, 4)


@pytest.mark.parametrize("name", NAMES)
def test_described(name):
    d = compressor_class(name).describe()
    assert d["paper"], f"{name} does not cite its paper"
    assert d["stage"] in d["stages"]
