"""Tiled best-match search in Triton: the fast path of :func:`mmtok.core.best_match`.

The matching step of bipartite soft matching (ToMe, Bolya et al., ICLR 2023, Sec. 3: each token of
set A is paired with its most cosine-similar token of set B). Same signature and result as the
torch reference: for each row of ``a`` the index of the most cosine-similar row of ``b`` (ties to
the smallest index, masked rows never chosen) and that similarity. The ``[N, M]`` similarity matrix
never exists: each program owns ``BLOCK_N`` rows of ``a`` and walks ``b`` in ``BLOCK_M`` tiles,
keeping a running max and argmax.

Exactness. The normalised rows are bitwise those of :func:`mmtok.core.similarity.normalize`:
the row norms are computed by the same torch ops on the same chunks as the reference
(``x.float().norm(dim=-1).clamp(min=1e-6)``) and each element is divided in the kernel with
IEEE round-to-nearest division (``tl.div_rn``, not Triton's approximate ``/``). The dot products
accumulate in float32 with ``input_precision="ieee"`` (never TF32). What still differs from the
reference is the order of the float32 additions inside each dot product (cuBLAS / MKL block them
their own way), worth a few ulp (about ``1e-7 * sqrt(C)`` relative). So indices equal the
reference's whenever the best and second-best similarities of a row differ by more than that;
exact duplicates in ``b`` (also scaled ones: ``2 * x`` normalises to the same bits) give
bitwise-equal similarities in both implementations, as long as each computes every output with the
same summation order (true of the FMA chain of ``tl.dot`` on a GPU and of the per-output reduction
used under the interpreter, see ``CPU_USE_DOT``), and the tie goes to the smallest index in both.
Two distinct candidates closer than that rounding may pick different winners: that is a property
of float32, not of this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmtok.core.matching import _CHUNK as _REFERENCE_CHUNK

NORM_EPS = 1e-6  # the ``eps`` of ``mmtok.core.similarity.normalize``

# (BLOCK_N, BLOCK_M, BLOCK_C, num_warps). Under the CPU interpreter the cost is per program and per
# loop iteration, so bigger tiles would be cheaper there; these stay small enough that the CPU tests
# still cross tile borders in every dimension with small shapes.
GPU_BLOCKS = (64, 64, 32, 4)
CPU_BLOCKS = (32, 32, 32, 1)
# Under the interpreter ``tl.dot`` is numpy's matmul (OpenBLAS), whose rounding depends on where an
# output sits in the tile, so exact duplicate rows of ``b`` would not tie. The interpreter therefore
# reduces each dot product on its own (same order for every output); on a GPU ``tl.dot`` with
# ``input_precision="ieee"`` is a chain of FMAs, identical for every output, and is used.
CPU_USE_DOT = False


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``[..., C] -> [...]`` float32: the divisor :func:`mmtok.core.similarity.normalize` uses.

    Computed by the same torch ops, so bitwise equal to the reference's for the same chunk of rows.
    """
    return x.float().norm(dim=-1).clamp(min=NORM_EPS)


@triton.jit
def _best_match_kernel(
    a_ptr,
    b_ptr,
    na_ptr,
    nb_ptr,
    mask_ptr,
    idx_ptr,
    score_ptr,
    N,
    M,
    C,
    s_ab,
    s_an,
    s_ac,
    s_bb,
    s_bm,
    s_bc,
    s_mb,
    s_mm,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    na = tl.load(na_ptr + bi * N + rows, mask=row_ok, other=1.0)
    a_rows = a_ptr + bi * s_ab + rows.to(tl.int64)[:, None] * s_an
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        nb = tl.load(nb_ptr + bi * M + cols, mask=col_ok, other=1.0)
        b_rows = b_ptr + bi * s_bb + cols.to(tl.int64)[:, None] * s_bm
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            ch_ok = ch < C
            at = tl.load(a_rows + ch[None, :] * s_ac, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
            bt = tl.load(b_rows + ch[None, :] * s_bc, mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
            at = tl.div_rn(at.to(tl.float32), na[:, None])
            bt = tl.div_rn(bt.to(tl.float32), nb[:, None])
            if USE_DOT:
                acc = tl.dot(at, tl.trans(bt), acc, input_precision="ieee")
            else:
                acc += tl.sum(at[:, None, :] * bt[None, :, :], axis=2)
        ok = col_ok
        if HAS_MASK:
            keep = tl.load(mask_ptr + bi * s_mb + cols * s_mm, mask=col_ok, other=0)
            ok = ok & (keep != 0)
        sim = tl.where(ok[None, :], acc, float("-inf"))
        if EXCLUDE_SELF:
            sim = tl.where(rows[:, None] == cols[None, :], float("-inf"), sim)
        tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Tiles come in increasing column order, so a strict ">" keeps the smallest index on ties.
        take = tile_best > best
        best = tl.where(take, tile_best, best)
        best_idx = tl.where(take, tile_arg + m0, best_idx)
    tl.store(idx_ptr + bi * N + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(score_ptr + bi * N + rows, best, mask=row_ok)


def match_normalized(
    a: torch.Tensor,
    b: torch.Tensor,
    na: torch.Tensor,
    nb: torch.Tensor,
    b_mask: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the tiled search with precomputed row norms.

    Args:
        a: ``[B, N, C]``.
        b: ``[B, M, C]`` (``a`` itself when ``exclude_self``).
        na: ``[B, N]`` float32 norms of ``a`` rows (see :func:`row_norms`).
        nb: ``[B, M]`` float32 norms of ``b`` rows.
        b_mask: ``[B, M]`` candidate rows of ``b``, or None for all.
        exclude_self: never match row ``i`` of ``a`` with row ``i`` of ``b`` (nearest *other* row).

    Returns:
        ``(index, score)``: ``[B, N]`` long and ``[B, N]`` float32 (index 0 and ``-inf`` for a row
        with no candidate, as ``torch.max`` gives over an all ``-inf`` row).
    """
    bsz, n, c = a.shape
    m = b.shape[1]
    idx = torch.zeros(bsz, n, dtype=torch.long, device=a.device)
    score = torch.full((bsz, n), float("-inf"), dtype=torch.float32, device=a.device)
    if bsz == 0 or n == 0 or m == 0:
        return idx, score
    na = na.to(torch.float32).contiguous()
    nb = nb.to(torch.float32).contiguous()
    if b_mask is not None:
        mask = b_mask.to(device=a.device, dtype=torch.int8)
        s_mb, s_mm = mask.stride()
    else:
        mask, s_mb, s_mm = nb, 0, 0
    block_n, block_m, block_c, warps = GPU_BLOCKS if a.is_cuda else CPU_BLOCKS
    grid = (triton.cdiv(n, block_n), bsz)
    _best_match_kernel[grid](
        a,
        b,
        na,
        nb,
        mask,
        idx,
        score,
        n,
        m,
        c,
        *a.stride(),
        *b.stride(),
        s_mb,
        s_mm,
        HAS_MASK=b_mask is not None,
        EXCLUDE_SELF=exclude_self,
        USE_DOT=a.is_cuda or CPU_USE_DOT,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return idx, score


def best_match(
    a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a``, the most cosine-similar row of ``b`` and that similarity.

    Triton version of :func:`mmtok.core.best_match` (same arguments, same results; see the module
    docstring for the float32 rounding caveat). Ties go to the smallest index of ``b``; rows of
    ``b`` with ``b_mask`` False are never chosen.

    Args:
        a: ``[B, N, C]``.
        b: ``[B, M, C]``.
        b_mask: ``[B, M]`` bool, candidate rows of ``b``; all when None (each row needs one).

    Returns:
        ``(index, score)``: ``[B, N]`` long and ``[B, N]`` float32.

    Raises:
        ValueError: for shapes other than ``a [B, N, C]``, ``b [B, M, C]``, ``b_mask [B, M]``, or an
            empty ``b``.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"best_match expects a [B, N, C] and b [B, M, C], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.shape[1] == 0:
        raise ValueError("best_match: b has no rows to match against")
    if b_mask is not None and tuple(b_mask.shape) != tuple(b.shape[:2]):
        raise ValueError(
            f"best_match: b_mask must have shape {tuple(b.shape[:2])}, got {tuple(b_mask.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"best_match: a and b must be on one device, got {a.device} and {b.device}")
    n = a.shape[1]
    # The reference normalises ``a`` chunk by chunk and ``b`` whole; norms of the same chunks keep
    # the normalised values bitwise equal to it.
    if n == 0:
        na = torch.empty(a.shape[0], 0, dtype=torch.float32, device=a.device)
    else:
        na = torch.cat([row_norms(a[:, s : s + _REFERENCE_CHUNK]) for s in range(0, n, _REFERENCE_CHUNK)], 1)
    return match_normalized(a, b, na, row_norms(b), b_mask)
