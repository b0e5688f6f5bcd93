"""Similarity primitives shared by compressors (pure torch, float32 internally)."""

from __future__ import annotations

import torch


def normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm, in float32. ``[..., C] -> [..., C]``."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosine similarity ``[..., N, C] x [..., M, C] -> [..., N, M]`` (float32)."""
    an = normalize(a)
    bn = an if b is None else normalize(b)
    return an @ bn.transpose(-1, -2)
