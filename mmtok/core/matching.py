"""Best-match search between two token sets: the torch reference of ``mmtok.kernels.best_match``."""

from __future__ import annotations

import torch

from mmtok.core.similarity import normalize

_CHUNK = 1024


def best_match(
    a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a``, the most cosine-similar row of ``b`` and that similarity.

    Ties go to the smallest index of ``b``. Rows of ``b`` with ``b_mask`` False are never chosen.
    Works in chunks of ``a`` so that only a ``[chunk, M]`` block of similarities exists at a time.

    Args:
        a: ``[B, N, C]``.
        b: ``[B, M, C]``.
        b_mask: ``[B, M]`` bool, candidate rows of ``b``; all when None (each row needs one).

    Returns:
        ``(index, score)``: ``[B, N]`` long and ``[B, N]`` float32.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"best_match expects a [B, N, C] and b [B, M, C], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.shape[1] == 0:
        raise ValueError("best_match: b has no rows to match against")
    bn = normalize(b)
    idx, score = [], []
    for start in range(0, a.shape[1], _CHUNK):
        sim = normalize(a[:, start : start + _CHUNK]) @ bn.transpose(1, 2)
        if b_mask is not None:
            sim = sim.masked_fill(~b_mask.bool().unsqueeze(1), float("-inf"))
        s, i = sim.max(dim=-1)
        idx.append(i)
        score.append(s)
    return torch.cat(idx, 1), torch.cat(score, 1)
