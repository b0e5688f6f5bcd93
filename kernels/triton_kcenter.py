"""Greedy k-center (farthest-point) selection in Triton: the fast path of :func:`mmtok.core.kcenter`.

Gonzalez's farthest-point algorithm as used by DivPrune (Alvar et al., CVPR 2025, Alg. 1), with one
fused kernel launch per step. Program ``(block, batch)`` of step ``s``:

1. reduces the previous step's per-block candidates (``NBLK`` values and indices) to the global
   argmax, ties to the earliest block and so to the smallest index: that is the row chosen at step
   ``s`` (step 0 reads candidates that encode ``first``); block 0 records it in ``chosen``;
2. computes the cosine distance ``1 - <x_i/|x_i|, x_c/|x_c|>`` of its ``BLOCK_N`` rows to that centre,
   lowers their min-distance entries to it and sets the centre's own entry to ``-inf``;
3. writes its block's max and argmax (ties to the smallest index) as the next step's candidates.

Candidates are double-buffered (step ``s`` reads buffer ``s % 2`` and writes the other), so no
program reads a buffer while another writes it, and no host synchronisation happens between steps.

Exactness: rows are normalised bitwise as the reference does (same torch norm ops, IEEE division in
the kernel); only the float32 summation order inside each dot product differs, so the chosen
indices equal the reference's unless two candidates' min-distances differ by less than a few ulp.
Exact duplicate rows tie exactly in both. Once every distinct row is chosen (``k`` above the number
of distinct rows) the remaining min-distances are ``1 - cos(x, x)``, pure rounding noise around 0,
and the order among those rows can differ from the reference.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from mmtok.kernels.triton_best_match import match_normalized, row_norms

# (BLOCK_N, BLOCK_C, num_warps); the CPU interpreter's blocks are small enough that the tests cross
# block borders with small shapes.
GPU_BLOCKS = (64, 128, 8)
CPU_BLOCKS = (32, 32, 1)


@triton.jit(do_not_specialize=["step"])
def _kcenter_step_kernel(
    x_ptr,
    norm_ptr,
    mind_ptr,
    in_val_ptr,
    in_idx_ptr,
    out_val_ptr,
    out_idx_ptr,
    chosen_ptr,
    step,
    N,
    C,
    K,
    NBLK,
    s_xb,
    s_xn,
    s_xc,
    UPDATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NBLK_P2: tl.constexpr,
):
    blk = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    j = tl.arange(0, NBLK_P2)
    cand = tl.load(in_val_ptr + bi * NBLK + j, mask=j < NBLK, other=float("-inf"))
    _, jbest = tl.max(cand, axis=0, return_indices=True, return_indices_tie_break_left=True)
    centre = tl.load(in_idx_ptr + bi * NBLK + jbest)
    if blk == 0:
        tl.store(chosen_ptr + bi * K + step, centre.to(tl.int64))
    if UPDATE:
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        x_rows = x_ptr + bi * s_xb + rows.to(tl.int64)[:, None] * s_xn
        x_cen = x_ptr + bi * s_xb + centre.to(tl.int64) * s_xn
        n_rows = tl.load(norm_ptr + bi * N + rows, mask=row_ok, other=1.0)
        n_cen = tl.load(norm_ptr + bi * N + centre)
        dot = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            ch_ok = ch < C
            xt = tl.load(x_rows + ch[None, :] * s_xc, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
            xc = tl.load(x_cen + ch * s_xc, mask=ch_ok, other=0.0)
            xt = tl.div_rn(xt.to(tl.float32), n_rows[:, None])
            xc = tl.div_rn(xc.to(tl.float32), n_cen)
            dot += tl.sum(xt * xc[None, :], axis=1)
        mind = tl.load(mind_ptr + bi * N + rows, mask=row_ok, other=float("-inf"))
        mind = tl.minimum(mind, 1.0 - dot)
        mind = tl.where(rows == centre, float("-inf"), mind)
        tl.store(mind_ptr + bi * N + rows, mind, mask=row_ok)
        mind = tl.where(row_ok, mind, float("-inf"))
        bval, barg = tl.max(mind, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_val_ptr + bi * NBLK + blk, bval)
        tl.store(out_idx_ptr + bi * NBLK + blk, blk * BLOCK_N + barg)


def kcenter(x: torch.Tensor, k: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min selection of ``k`` rows under cosine distance ``1 - cos(x_i, x_j)``.

    Triton version of :func:`mmtok.core.kcenter` (DivPrune, Alvar et al., CVPR 2025, Alg. 1; same
    arguments and results, see the module docstring for the fused step and the rounding caveat).
    With ``first=None`` the first row is the one whose nearest other row is farthest, found by the
    tiled search of :mod:`mmtok.kernels.triton_best_match` with the diagonal excluded.

    Args:
        x: ``[B, N, C]`` features.
        k: how many rows to select, ``1 <= k <= N``.
        first: ``[B]`` long, the first selected row of each batch, in ``[0, N)``; or None.

    Returns:
        ``[B, k]`` long indices in selection order.

    Raises:
        ValueError: for ``x`` not 3-D, ``k`` outside ``[1, N]``, or ``first`` of the wrong size or
            outside ``[0, N)``.
        TypeError: for a non-integer ``k``.
    """
    if x.dim() != 3:
        raise ValueError(f"kcenter expects x of shape [B, N, C], got {tuple(x.shape)}")
    if isinstance(k, bool):
        raise TypeError("kcenter: k must be an int, got bool")
    k = operator.index(k)
    bsz, n, c = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kcenter: k must be in [1, N={n}], got {k}")
    chosen = torch.empty(bsz, k, dtype=torch.long, device=x.device)
    if bsz == 0:
        return chosen
    norms = row_norms(x).contiguous()
    if first is None:
        first = _most_isolated(x, norms)
    else:
        if first.numel() != bsz:
            raise ValueError(f"kcenter: first must hold one index per batch row ({bsz}), got {first.numel()}")
        first = first.to(device=x.device, dtype=torch.long).reshape(bsz)
        if bool(((first < 0) | (first >= n)).any()):
            raise ValueError(f"kcenter: first must be in [0, N={n}), got {first.tolist()}")

    block_n, block_c, warps = GPU_BLOCKS if x.is_cuda else CPU_BLOCKS
    nblk = triton.cdiv(n, block_n)
    mind = torch.full((bsz, n), float("inf"), dtype=torch.float32, device=x.device)
    vals = torch.full((2, bsz, nblk), float("-inf"), dtype=torch.float32, device=x.device)
    idxs = torch.zeros(2, bsz, nblk, dtype=torch.int32, device=x.device)
    # Step 0's "candidates": a single finite entry pointing at ``first``.
    vals[0, :, 0] = 0.0
    idxs[0, :, 0] = first.to(torch.int32)
    for step in range(k):
        update = step < k - 1
        src, dst = step % 2, (step + 1) % 2
        _kcenter_step_kernel[(nblk if update else 1, bsz)](
            x,
            norms,
            mind,
            vals[src],
            idxs[src],
            vals[dst],
            idxs[dst],
            chosen,
            step,
            n,
            c,
            k,
            nblk,
            *x.stride(),
            UPDATE=update,
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            NBLK_P2=max(16, triton.next_power_of_2(nblk)),
            num_warps=warps,
        )
    return chosen


def _most_isolated(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the row whose nearest other row is farthest: ``argmax_i min_{j != i} d(i, j)``."""
    if x.shape[1] == 1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    _, nearest_sim = match_normalized(x, x, norms, norms, exclude_self=True)
    # Same expression as the reference, so equal similarities give the same argmax.
    return (1.0 - nearest_sim).argmax(dim=1)
