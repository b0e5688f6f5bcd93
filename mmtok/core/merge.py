"""Weighted scatter-merge of tokens into groups: the torch reference of ``mmtok.kernels.merge_tokens``."""

from __future__ import annotations

import torch


def merge_tokens(
    x: torch.Tensor, assign: torch.Tensor, weights: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted means of the tokens assigned to each group.

    ``means[b, k] = sum_i w[b, i] x[b, i] / sum_i w[b, i]`` over ``i`` with ``assign[b, i] == k``;
    tokens with ``assign == -1`` are dropped. Groups with no member get zeros and size 0.
    Accumulates in float32 whatever the input dtype.

    Args:
        x: ``[B, N, C]`` token features.
        assign: ``[B, N]`` long, group of each token in ``[0, num_groups)`` or -1.
        weights: ``[B, N]`` non-negative token weights (sizes).
        num_groups: ``K``, the number of output groups.

    Returns:
        ``(means, sizes)``: ``[B, K, C]`` in ``x.dtype`` and ``[B, K]`` float32 summed weights.
    """
    b, n, c = x.shape
    valid = assign >= 0
    w = weights.float() * valid
    flat = (assign.clamp(min=0) + torch.arange(b, device=x.device).unsqueeze(1) * num_groups).reshape(-1)
    sums = torch.zeros(b * num_groups, c, dtype=torch.float32, device=x.device)
    sums.index_add_(0, flat, (x.float() * w.unsqueeze(-1)).reshape(-1, c))
    sizes = torch.zeros(b * num_groups, dtype=torch.float32, device=x.device)
    sizes.index_add_(0, flat, w.reshape(-1))
    means = sums / sizes.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return means.reshape(b, num_groups, c).to(x.dtype), sizes.reshape(b, num_groups)
