"""``hiprune``: anchor, buffer and register tokens from the vision encoder's hierarchical attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.cls_attn import top_by_score
from mmtok.core import RowPlan, TokenRow

_CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def grid_neighbours(index: torch.Tensor, grid: tuple[int, ...], connectivity: int = 4) -> torch.Tensor:
    """Spatial neighbours of tokens on their frame of the grid (no wrap-around at the edges).

    Args:
        index: ``[m]`` long raster indices into a ``(H, W)`` or ``(T, H, W)`` grid.
        grid: the grid.
        connectivity: 4 (up, down, left, right) or 8 (also the diagonals).

    Returns:
        ``[m']`` long unique neighbour indices (inside the grid, in the same frame), ascending.
    """
    h, w = grid[-2], grid[-1]
    frame, rc = index // (h * w), index % (h * w)
    r, c = rc // w, rc % w
    offsets = _CROSS + (_DIAGONAL if connectivity == 8 else ())
    found = []
    for dr, dc in offsets:
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        found.append(((frame * h + rr) * w + cc)[ok])
    return torch.unique(torch.cat(found))


@register("hiprune")
@dataclass
class HiPrune(Compressor):
    """HiPrune: keep anchor, buffer and register tokens chosen by attention at two encoder depths.

    Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision-Language Models", 2025 (arXiv 2508.00553). Middle vision-encoder layers attend to objects,
    deep layers to global context; with a budget of ``k`` tokens:

    1. *Anchor tokens*: the ``round(k * alpha / (1 + connectivity))`` tokens with the highest attention
       at the object-centric middle layer (``row.signals["mid_attn"]``; the paper's layer 9 of CLIP
       ViT-L, 16 of Qwen2.5-VL's encoder), ties to the lower index.
    2. *Buffer tokens*: the grid neighbours of the anchors in their frame (4-connected, as in the paper;
       8-connected as an option), for spatial continuity. Anchors and buffers together take about
       ``alpha * k`` of the budget. Neighbours are taken on the 2-D grid, so a token at the end of a row
       has no neighbour at the start of the next one. Should anchors and buffers exceed ``k`` (only for
       large ``alpha`` and tiny ``k``), the anchors are kept first, then the buffers with the highest
       middle-layer attention.
    3. *Register tokens*: the rest of the budget, the tokens with the highest attention at the output
       layer (``row.cls_attn``) among those not yet chosen.

    The default ``alpha = 0.1`` is the authors'. With it, budgets below 25 hold no anchor (as in their
    code, which rounds half to even where this rounds half up, so the two differ at exactly 25) and the
    method keeps the top output-layer tokens. The authors' code scores tokens at both layers by the mean
    attention they receive from all queries rather than the CLS row; which score fills ``mid_attn`` and
    ``cls_attn`` is the adapter's choice.

    Args:
        alpha: share of the budget for anchor plus buffer tokens, in ``[0, 1]``.
        connectivity: buffer neighbourhood, 4 or 8.
    """

    paper = (
        "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language "
        "Models (Liu et al., 2025)"
    )
    stage = "vision"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video")
    requires = frozenset({"cls_attn", "mid_attn", "grid"})

    alpha: float = 0.1
    connectivity: int = 4

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"hiprune: alpha must be a number in [0, 1], got {a!r}")
        if self.connectivity not in (4, 8) or isinstance(self.connectivity, bool):
            raise ValueError(f"hiprune: connectivity must be 4 or 8, got {self.connectivity!r}")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Anchors and their buffers first, then registers by output-layer attention, ``k`` in all."""
        if row.grid is None:
            raise ValueError(
                "hiprune needs the (H, W) or (T, H, W) grid of every segment it compresses; this segment "
                "has none (pass grid= to VisualTokens, or segments that are whole frames)"
            )
        mid = row.signals["mid_attn"]
        if mid.dim() != 1:
            raise ValueError(
                "hiprune: signals['mid_attn'] must hold one score per token ([B, N]), "
                f"got {mid.dim()} dims per row"
            )
        device = row.features.device
        n_anchor = min(k, math.floor(k * self.alpha / (1 + self.connectivity) + 0.5))
        anchors = top_by_score(mid, n_anchor)
        chosen = torch.zeros(row.n, dtype=torch.bool, device=device)
        chosen[anchors] = True
        parts = [anchors]
        if n_anchor:
            near = grid_neighbours(anchors, row.grid, self.connectivity)
            near = near[~chosen[near]]
            buffers = near[top_by_score(mid[near], near.numel())][: k - n_anchor]
            chosen[buffers] = True
            parts.append(buffers)
        score = row.cls_attn.float().masked_fill(chosen, float("-inf"))
        parts.append(top_by_score(score, k - int(chosen.sum())))
        return RowPlan(torch.cat(parts))
