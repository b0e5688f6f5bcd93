"""Triton kernels against their torch references (the spec), through the dispatcher.

On a CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so the shapes here are
small but chosen to cross every tile border (CPU tiles are 32 rows / 32-64 channels). The
``gpu``-marked tests use real shapes and run only where CUDA is available.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mmtok.core as core
from mmtok.kernels import best_match, dispatch, kcenter, merge_tokens

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# dispatcher


def test_cpu_default_is_torch_and_env_or_argument_selects(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MMTOK_KERNELS", raising=False)
    assert dispatch.resolve_impl(cpu) == "torch"
    assert dispatch._dispatch("kcenter", cpu, None) is core.kcenter
    assert dispatch.triton_available() and dispatch.available_impls() == ["torch", "triton"]
    monkeypatch.setenv("MMTOK_KERNELS", "triton")
    assert dispatch.resolve_impl(cpu) == "triton"
    from mmtok.kernels import triton_kcenter

    assert dispatch._dispatch("kcenter", cpu, None) is triton_kcenter.kcenter
    # the argument wins over the environment
    assert dispatch.resolve_impl(cpu, "torch") == "torch"
    assert dispatch._dispatch("best_match", cpu, "torch") is core.best_match
    monkeypatch.setenv("MMTOK_KERNELS", "torch")
    assert dispatch.resolve_impl(cpu, "triton") == "triton"
    assert dispatch._dispatch("merge_tokens", cpu, None) is core.merge_tokens


def test_cuda_default_is_the_faster_implementation_per_kernel(monkeypatch):
    monkeypatch.delenv("MMTOK_KERNELS", raising=False)
    cuda = torch.device("cuda")  # resolve_impl only reads the device type: no GPU needed
    assert dispatch.resolve_impl(cuda, kernel="merge_tokens") == "triton"
    assert dispatch.resolve_impl(cuda, kernel="kcenter") == "triton"
    assert dispatch.resolve_impl(cuda, kernel="best_match") == "torch"  # measured slower (docs/benchmarks.md)
    assert dispatch.resolve_impl(cuda, "triton", kernel="best_match") == "triton"
    monkeypatch.setenv("MMTOK_KERNELS", "triton")
    assert dispatch.resolve_impl(cuda, kernel="best_match") == "triton"


def test_env_override_runs_the_kernel(monkeypatch):
    from mmtok.kernels import triton_best_match

    calls = []
    real = triton_best_match.match_normalized
    spy = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(triton_best_match, "match_normalized", spy)
    monkeypatch.setenv("MMTOK_KERNELS", "triton")
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]]])
    idx, score = best_match(a, b)
    assert calls == [1], "MMTOK_KERNELS=triton did not reach the Triton kernel"
    assert idx.tolist() == [[2, 0]]
    assert score[0].tolist() == pytest.approx([1.0, 1.0])
    monkeypatch.setenv("MMTOK_KERNELS", "torch")
    best_match(a, b)
    best_match(a, b, impl="torch")
    assert calls == [1]


@pytest.mark.parametrize("bad", ["cuda", "TRITON", "", "auto"])
def test_bad_impl_argument_is_a_value_error(bad):
    with pytest.raises(ValueError, match="kernel impl must be one of"):
        kcenter(torch.randn(1, 4, 3), 2, impl=bad)


def test_bad_env_value_is_a_value_error(monkeypatch):
    monkeypatch.setenv("MMTOK_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MMTOK_KERNELS"):
        merge_tokens(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), 1)


def test_importing_mmtok_does_not_import_triton():
    code = "import sys, mmtok, mmtok.kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


# ---------------------------------------------------------------------------------------------------
# merge_tokens


def _merge_close(x, assign, w, k):
    got_m, got_s = merge_tokens(x, assign, w, k, impl="triton")
    ref_m, ref_s = core.merge_tokens(x, assign, w, k)
    assert got_m.dtype == x.dtype and got_m.shape == ref_m.shape and got_s.dtype == torch.float32
    torch.testing.assert_close(got_s, ref_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_m, ref_m)
    empty = ref_s == 0
    assert torch.equal(got_s[empty], ref_s[empty]) and not got_m[empty].any()
    return got_m, got_s


def test_merge_known_answer():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])
    assign, w = torch.tensor([[0, 0, 1, -1]]), torch.tensor([[1.0, 3.0, 2.0, 5.0]])
    means, sizes = merge_tokens(x, assign, w, 3, impl="triton")
    assert means.tolist() == [[[2.5, 3.5], [5.0, 6.0], [0.0, 0.0]]]
    assert sizes.tolist() == [[4.0, 2.0, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_random_ragged_with_empty_groups(dtype):
    g = _gen(1)
    b, n, c, k = 2, 45, 100, 9  # N crosses the 32-row tile, C the 64-channel tile
    x = torch.randn(b, n, c, generator=g).to(dtype)
    assign = torch.randint(0, k - 2, (b, n), generator=g)  # groups k-2 and k-1 stay empty
    assign[0, ::4] = -1
    assign[1, 30:] = -1  # ragged: row 1 has 30 tokens
    w = torch.rand(b, n, generator=g) * 3 + 0.1
    _, sizes = _merge_close(x, assign, w, k)
    assert (sizes[:, k - 2 :] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_k_equals_n_permutation_is_exact(dtype):
    g = _gen(2)
    x = torch.randn(2, 40, 70, generator=g).to(dtype)
    assign = torch.stack([torch.randperm(40, generator=g) for _ in range(2)])
    w = torch.rand(2, 40, generator=g) + 0.5
    got, sizes = merge_tokens(x, assign, w, 40, impl="triton")
    ref, ref_sizes = core.merge_tokens(x, assign, w, 40)
    # one member per group: a single product and a single division, bitwise the reference's
    assert torch.equal(got, ref) and torch.equal(sizes, ref_sizes)


def test_merge_k_one_and_strided_input():
    g = _gen(3)
    x = torch.randn(3, 50, 33, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.rand(3, 100, generator=g)[:, ::2]
    assign = torch.zeros(3, 100, dtype=torch.int32)[:, ::2]
    assert not (x.is_contiguous() or w.is_contiguous() or assign.is_contiguous())
    _merge_close(x, assign, w, 1)
    means, sizes = merge_tokens(x, torch.full((3, 50), -1), w, 2, impl="triton")
    assert not means.any() and not sizes.any()


@pytest.mark.parametrize(
    "args, err",
    [
        ((torch.randn(4, 3), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), 2), ValueError),
        ((torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4), 2), ValueError),
        ((torch.randn(1, 4, 3), torch.zeros(1, 4), torch.ones(1, 4), 2), TypeError),
        ((torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), -1), ValueError),
        ((torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), 2.0), TypeError),
    ],
)
def test_merge_rejects_bad_input(args, err):
    with pytest.raises(err):
        merge_tokens(*args, impl="triton")


# ---------------------------------------------------------------------------------------------------
# best_match


def _match_equal(a, b, mask=None):
    got_i, got_s = best_match(a, b, mask, impl="triton")
    ref_i, ref_s = core.best_match(a, b, mask)
    assert got_i.dtype == torch.long and got_s.dtype == torch.float32
    assert torch.equal(got_i, ref_i)
    torch.testing.assert_close(got_s, ref_s, rtol=0, atol=2e-6)
    return got_i, got_s


def test_best_match_known_answer_and_duplicate_ties():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [2.0, 2.0]]])  # rows 1 and 3 tie exactly
    idx, score = best_match(a, b, impl="triton")
    assert idx.tolist() == [[2, 0, 1]]
    assert score[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    idx, _ = best_match(a, b, torch.tensor([[True, False, True, True]]), impl="triton")
    assert idx.tolist() == [[2, 0, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_best_match_random_with_ties_and_ragged_mask(dtype):
    g = _gen(4)
    b, n, m, c = 2, 45, 70, 40  # every dimension crosses a 32-wide tile
    a = torch.randn(b, n, c, generator=g)
    bb = torch.randn(b, m, c, generator=g)
    bb[:, 4] = bb[:, 3]  # duplicate in the same tile
    bb[:, 60] = 2 * bb[:, 3]  # scaled duplicate in another tile: same normalised row, bitwise
    a[:, 10] = bb[:, 3] + 0.01 * a[:, 10]
    a[:, 40] = -0.5 * bb[:, 60]
    a, bb = a.to(dtype), bb.to(dtype)
    idx, _ = _match_equal(a, bb)
    assert idx[:, 10].tolist() == [3, 3]
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 50:] = False  # ragged: row 0 has 50 candidates
    mask[1, 3] = False  # the first duplicate is masked out: the tie moves to its twin
    mask[1, ::7] = False
    idx, _ = _match_equal(a, bb, mask)
    assert idx[:, 10].tolist() == [3, 4]


def test_best_match_single_candidate_fully_masked_row_and_strides():
    g = _gen(5)
    a = torch.randn(3, 40, 33, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    _match_equal(a, torch.randn(3, 1, 33, generator=g))
    b = torch.randn(3, 20, 33, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[2] = False
    idx, score = _match_equal(a, b, mask)  # the reference's torch.max gives index 0 and -inf
    assert (idx[2] == 0).all() and torch.isinf(score[2]).all()


def test_best_match_tl_dot_path(monkeypatch):
    # The interpreter reduces dot products one by one (see CPU_USE_DOT); the GPU path uses tl.dot.
    from mmtok.kernels import triton_best_match

    monkeypatch.setattr(triton_best_match, "CPU_USE_DOT", True)
    g = _gen(6)
    a, b = torch.randn(2, 40, 48, generator=g), torch.randn(2, 50, 48, generator=g)
    _match_equal(a, b, torch.rand(2, 50, generator=g) > 0.2)


@pytest.mark.parametrize(
    "a, b, mask",
    [
        (torch.randn(4, 3), torch.randn(1, 4, 3), None),
        (torch.randn(1, 4, 3), torch.randn(1, 4, 2), None),
        (torch.randn(1, 4, 3), torch.randn(1, 0, 3), None),
        (torch.randn(1, 4, 3), torch.randn(1, 5, 3), torch.ones(1, 4, dtype=torch.bool)),
    ],
)
def test_best_match_rejects_bad_input(a, b, mask):
    with pytest.raises(ValueError):
        best_match(a, b, mask, impl="triton")


# ---------------------------------------------------------------------------------------------------
# kcenter


def _kcenter_equal(x, k, first=None):
    got = kcenter(x, k, first, impl="triton")
    ref = core.kcenter(x, k, first)
    assert got.dtype == torch.long and torch.equal(got, ref), (got, ref)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
def test_kcenter_random(dtype):
    g = _gen(7)
    x = torch.randn(2, 45, 40, generator=g).to(dtype)  # 2 blocks of 32 rows, 2 channel tiles
    _kcenter_equal(x, 6, torch.tensor([44, 3]))
    if dtype == torch.float32:
        _kcenter_equal(x, 6)  # first=None: the most isolated row, found by the tiled search


def test_kcenter_exact_ties_known_answer():
    # e0 is the first centre; the antipodes -e0 (rows 7 and 37, one scaled) tie at distance 2; then the
    # one-hots e1, e2, e3 (rows 12, 33, 40) tie at distance exactly 1 from both: smallest index first.
    g = _gen(8)
    x = torch.randn(1, 45, 16, generator=g).abs() * 0.2
    x[..., 0] += 3.0  # every other row sits close to e0
    eye = torch.eye(16)
    x[0, 0], x[0, 7], x[0, 37] = eye[0], -eye[0], -3 * eye[0]
    x[0, 12], x[0, 33], x[0, 40] = eye[3], eye[2], eye[1]
    for dtype in DTYPES:
        got = _kcenter_equal(x.to(dtype), 5, torch.tensor([0]))
        assert got.tolist() == [[0, 7, 12, 33, 40]]


def test_kcenter_k_equals_n_and_k_one():
    g = _gen(9)
    x = torch.randn(1, 20, 24, generator=g)
    got = _kcenter_equal(x, 20, torch.tensor([5]))
    assert sorted(got[0].tolist()) == list(range(20))
    x = torch.randn(3, 40, 8, generator=g)
    assert _kcenter_equal(x, 1, torch.tensor([39, 0, 17])).tolist() == [[39], [0], [17]]
    _kcenter_equal(x, 1)
    assert kcenter(x[:, :1], 1, impl="triton").tolist() == [[0], [0], [0]]


@pytest.mark.parametrize(
    "x, k, first, err",
    [
        (torch.randn(4, 3), 1, None, ValueError),
        (torch.randn(1, 4, 3), 0, None, ValueError),
        (torch.randn(1, 4, 3), 5, None, ValueError),
        (torch.randn(1, 4, 3), 2, torch.tensor([4]), ValueError),
        (torch.randn(2, 4, 3), 2, torch.tensor([1]), ValueError),
        (torch.randn(1, 4, 3), 2.0, None, TypeError),
    ],
)
def test_kcenter_rejects_bad_input(x, k, first, err):
    with pytest.raises(err):
        kcenter(x, k, first, impl="triton")


# ---------------------------------------------------------------------------------------------------
# GPU, real shapes. Random data can hold near-ties below float32 rounding, so an index may differ
# from the reference only where the reference's own similarities say the two choices are within 1e-5.


def _gpu_match_check(a, b, mask, got_i, got_s):
    ref_i, ref_s = core.best_match(a, b, mask)
    torch.testing.assert_close(got_s, ref_s, rtol=0, atol=1e-5)
    diff = (got_i != ref_i).nonzero()
    assert diff.shape[0] <= max(1, got_i.numel() // 1000)
    bn = core.normalize(b)
    for bi, i in diff.tolist():
        an = core.normalize(a[bi, i])
        assert (an @ bn[bi, ref_i[bi, i]] - an @ bn[bi, got_i[bi, i]]).abs() < 1e-5


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("c", [1024, 3584])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_best_match_real_shapes(c, dtype):
    g = torch.Generator(device="cuda").manual_seed(10)
    a = torch.randn(2, 4608, c, device="cuda", generator=g, dtype=dtype)
    b = torch.randn(2, 4608, c, device="cuda", generator=g, dtype=dtype)
    b[:, 4000] = b[:, 17]
    a[:, :100] = b[:, 17:117] + 0.1 * a[:, :100]
    mask = torch.ones(2, 4608, dtype=torch.bool, device="cuda")
    mask[1, 3000:] = False
    for m in (None, mask):
        got_i, got_s = best_match(a, b, m, impl="triton")
        _gpu_match_check(a, b, m, got_i, got_s)
        assert (got_i[:, 0] == 17).all()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("c", [1024, 3584])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_merge_real_shapes(c, dtype):
    g = torch.Generator(device="cuda").manual_seed(11)
    n, k = 9216, 2304
    x = torch.randn(2, n, c, device="cuda", generator=g, dtype=dtype)
    assign = torch.randint(-1, k, (2, n), device="cuda", generator=g)
    w = torch.rand(2, n, device="cuda", generator=g) + 0.5
    got_m, got_s = merge_tokens(x, assign, w, k, impl="triton")
    ref_m, ref_s = core.merge_tokens(x, assign, w, k)
    torch.testing.assert_close(got_s, ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_m, ref_m)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("c", [1024, 3584])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kcenter_real_shapes(c, dtype):
    g = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(2, 9216, c, device="cuda", generator=g, dtype=dtype)
    k = 256
    got = kcenter(x, k, impl="triton")
    ref = core.kcenter(x, k)
    assert got.shape == (2, k) and torch.equal(got[:, 0], ref[:, 0])
    xn = core.normalize(x)
    for bi in range(2):
        same = (got[bi] == ref[bi]).long().cumprod(0).sum().item()
        if same == k:
            continue
        # first divergence: both choices must be (near-)ties of the reference's min-distance there
        mind = (1 - xn[bi] @ xn[bi, ref[bi, :same]].T).min(dim=1).values
        assert (mind[ref[bi, same]] - mind[got[bi, same]]).abs() < 1e-5
