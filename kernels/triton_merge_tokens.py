"""Weighted scatter-merge of tokens in Triton: the fast path of :func:`mmtok.core.merge_tokens`.

The merge step of token merging: each group becomes the size-weighted mean of its members and its
size the sum of theirs (ToMe, Bolya et al., ICLR 2023, Sec. 3 "tracking token size").

Two launches. The scatter kernel (one program per block of ``BLOCK_N`` tokens, ``BLOCK_C``
channels and batch row) multiplies each token by its weight in float32 and adds it with
``tl.atomic_add`` into a float32 ``[B, K, C]`` sum buffer; the programs of the first channel tile
also add the weights into the ``[B, K]`` sizes. The divide kernel then writes
``sums / max(sizes, tiny)`` in ``x.dtype`` (empty groups: ``0 / tiny = 0``, size 0), as the
reference does. Tokens with ``assign == -1`` are skipped.

Float32 atomic additions land in an unspecified order on a GPU, so sums match the reference to
float32 rounding (``allclose``), not bitwise, and may differ by an ulp from run to run. A group with
a single member is bitwise the reference's (one product, one division). Under the CPU interpreter
the final float32 -> bfloat16 cast is done by torch, as the interpreter truncates it.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_C, num_warps). Under the CPU interpreter the cost is per program; these blocks
# still let small CPU tests cross tile borders in N and C.
GPU_BLOCKS = (32, 128, 4)
CPU_BLOCKS = (32, 64, 1)
# (BLOCK_R, BLOCK_C) of the divide kernel.
GPU_DIVIDE_BLOCKS = (16, 256)
CPU_DIVIDE_BLOCKS = (64, 64)
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _scatter_kernel(
    x_ptr,
    assign_ptr,
    w_ptr,
    sums_ptr,
    sizes_ptr,
    N,
    C,
    K,
    s_xb,
    s_xn,
    s_xc,
    s_ab,
    s_an,
    s_wb,
    s_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    group = tl.load(assign_ptr + bi * s_ab + rows * s_an, mask=row_ok, other=-1).to(tl.int64)
    # Out-of-range groups are skipped rather than written out of bounds.
    valid = row_ok & (group >= 0) & (group < K)
    w = tl.load(w_ptr + bi * s_wb + rows * s_wn, mask=valid, other=0.0).to(tl.float32)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tile_ok = valid[:, None] & (ch < C)[None, :]
    x_rows = x_ptr + bi * s_xb + rows.to(tl.int64)[:, None] * s_xn
    xt = tl.load(x_rows + ch[None, :] * s_xc, mask=tile_ok, other=0.0).to(tl.float32)
    slot = bi * K + group
    tl.atomic_add(sums_ptr + slot[:, None] * C + ch[None, :], xt * w[:, None], mask=tile_ok, sem="relaxed")
    if pid_c == 0:
        tl.atomic_add(sizes_ptr + slot, w, mask=valid, sem="relaxed")


@triton.jit
def _divide_kernel(
    sums_ptr, sizes_ptr, out_ptr, R, C, tiny, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r < R)[:, None] & (ch < C)[None, :]
    size = tl.maximum(tl.load(sizes_ptr + r, mask=r < R, other=1.0), tiny)
    offs = r[:, None] * C + ch[None, :]
    mean = tl.div_rn(tl.load(sums_ptr + offs, mask=ok, other=0.0), size[:, None])
    tl.store(out_ptr + offs, mean.to(out_ptr.dtype.element_ty), mask=ok)


def merge_tokens(
    x: torch.Tensor, assign: torch.Tensor, weights: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted means of the tokens assigned to each group.

    Triton version of :func:`mmtok.core.merge_tokens` (same arguments and results up to float32
    summation order): ``means[b, k] = sum_i w[b, i] x[b, i] / sum_i w[b, i]`` over ``i`` with
    ``assign[b, i] == k``; tokens with ``assign == -1`` are dropped; groups with no member get zeros
    and size 0. Accumulates in float32 whatever the input dtype. Unlike the reference, an ``assign``
    value ``>= num_groups`` is skipped instead of raising (checking it would cost a device sync).

    Args:
        x: ``[B, N, C]`` token features.
        assign: ``[B, N]`` integer, group of each token in ``[0, num_groups)`` or -1.
        weights: ``[B, N]`` non-negative token weights (sizes).
        num_groups: ``K``, the number of output groups.

    Returns:
        ``(means, sizes)``: ``[B, K, C]`` in ``x.dtype`` and ``[B, K]`` float32 summed weights.

    Raises:
        ValueError: for shapes other than ``x [B, N, C]``, ``assign`` and ``weights [B, N]``, a
            negative ``num_groups``, or tensors on different devices.
        TypeError: for a non-integer ``assign`` or ``num_groups``.
    """
    if x.dim() != 3:
        raise ValueError(f"merge_tokens expects x of shape [B, N, C], got {tuple(x.shape)}")
    bsz, n, c = x.shape
    if tuple(assign.shape) != (bsz, n) or tuple(weights.shape) != (bsz, n):
        raise ValueError(
            f"merge_tokens: assign and weights must have shape {(bsz, n)}, "
            f"got {tuple(assign.shape)} and {tuple(weights.shape)}"
        )
    if assign.dtype.is_floating_point or assign.dtype.is_complex or assign.dtype == torch.bool:
        raise TypeError(f"merge_tokens: assign must be an integer tensor, got {assign.dtype}")
    if isinstance(num_groups, bool):
        raise TypeError("merge_tokens: num_groups must be an int, got bool")
    num_groups = operator.index(num_groups)
    if num_groups < 0:
        raise ValueError(f"merge_tokens: num_groups must be >= 0, got {num_groups}")
    if assign.device != x.device or weights.device != x.device:
        raise ValueError(
            f"merge_tokens: x, assign and weights must be on one device, got "
            f"{x.device}, {assign.device}, {weights.device}"
        )
    k = num_groups
    sums = torch.zeros(bsz, k, c, dtype=torch.float32, device=x.device)
    sizes = torch.zeros(bsz, k, dtype=torch.float32, device=x.device)
    means = torch.empty(bsz, k, c, dtype=x.dtype, device=x.device)
    if bsz * k == 0:
        return means, sizes
    block_n, block_c, warps = GPU_BLOCKS if x.is_cuda else CPU_BLOCKS
    if n > 0 and c > 0:
        _scatter_kernel[(triton.cdiv(n, block_n), triton.cdiv(c, block_c), bsz)](
            x,
            assign,
            weights,
            sums,
            sizes,
            n,
            c,
            k,
            *x.stride(),
            *assign.stride(),
            *weights.stride(),
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    if c == 0:
        return means, sizes
    # The interpreter (triton 3.9) truncates float32 -> bfloat16 instead of rounding to nearest even
    # as the GPU and torch do, so there the cast is left to torch.
    torch_cast = not x.is_cuda and x.dtype == torch.bfloat16
    out = torch.empty(bsz, k, c, dtype=torch.float32, device=x.device) if torch_cast else means
    block_r, block_c = GPU_DIVIDE_BLOCKS if x.is_cuda else CPU_DIVIDE_BLOCKS
    _divide_kernel[(triton.cdiv(bsz * k, block_r), triton.cdiv(c, block_c))](
        sums, sizes, out, bsz * k, c, _TINY, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4
    )
    return (out.to(x.dtype) if torch_cast else means), sizes
