"""Greedy k-center (farthest-point) selection: the torch reference of ``mmtok.kernels.kcenter``."""

from __future__ import annotations

import torch

from mmtok.core.similarity import normalize


def kcenter(x: torch.Tensor, k: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min selection of ``k`` rows under cosine distance ``1 - cos(x_i, x_j)``.

    Gonzalez's farthest-point algorithm, the greedy solver of the Max-Min Diversity Problem used by
    DivPrune (Alvar et al., CVPR 2025, Alg. 1): start from ``first``, then repeatedly add the row
    whose distance to its nearest selected row is largest, updating that min-distance vector in one
    pass per step. Ties go to the smallest index.

    Args:
        x: ``[B, N, C]`` features.
        k: how many rows to select, ``1 <= k <= N``.
        first: ``[B]`` long, the first selected row of each batch; when None, the row whose nearest
            other row is farthest (DivPrune's first step: ``argmax_i min_{j != i} d(i, j)``).

    Returns:
        ``[B, k]`` long indices in selection order.
    """
    if x.dim() != 3:
        raise ValueError(f"kcenter expects x of shape [B, N, C], got {tuple(x.shape)}")
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kcenter: k must be in [1, N={n}], got {k}")
    xn = normalize(x)
    if first is None:
        first = _most_isolated(xn)
    first = first.to(device=x.device, dtype=torch.long).reshape(b)
    chosen = torch.empty(b, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = first
    rows = torch.arange(b, device=x.device)
    mind = 1.0 - torch.einsum("bnc,bc->bn", xn, xn[rows, first])
    mind[rows, first] = float("-inf")
    for step in range(1, k):
        nxt = mind.argmax(dim=1)
        chosen[:, step] = nxt
        d = 1.0 - torch.einsum("bnc,bc->bn", xn, xn[rows, nxt])
        mind = torch.minimum(mind, d)
        mind[rows.unsqueeze(1), chosen[:, : step + 1]] = float("-inf")
    return chosen


def _most_isolated(xn: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[B]`` index of the row with the largest distance to its nearest other row (``xn`` unit rows)."""
    b, n, _ = xn.shape
    if n == 1:
        return torch.zeros(b, dtype=torch.long, device=xn.device)
    best = []
    for start in range(0, n, chunk):
        sim = xn[:, start : start + chunk] @ xn.transpose(1, 2)
        ar = torch.arange(start, min(start + chunk, n), device=xn.device)
        sim[:, ar - start, ar] = float("-inf")
        best.append(sim.max(dim=-1).values)
    nearest_sim = torch.cat(best, 1)
    return (1.0 - nearest_sim).argmax(dim=1)
