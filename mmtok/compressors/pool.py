"""``pool``: 2-D average pooling of the token grid into exactly ``k`` tokens (LLaVolta's compressor)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.uniform import grid_windows
from mmtok.core import RowPlan, TokenRow


@register("pool")
@dataclass
class Pool(Compressor):
    """Average-pool the tokens over ``k`` non-overlapping windows that tile the grid.

    LLaVolta (Chen et al., "Efficient Large Multi-modal Models via Visual Context Compression",
    NeurIPS 2024, arXiv 2406.20092) compresses the visual tokens with its Visual Context Compressor, an
    average pooling of the visual tokens with stride ``s`` (``N -> N / s`` tokens), applied with
    decreasing compression over its stage-wise training schedule; its test-time study shows that plain
    average pooling removes most visual tokens at a small accuracy cost. This is that pooling operator,
    applied to the visual tokens once: every input token belongs to exactly one window (none is
    dropped) and each output token is the size-weighted mean of its window (the plain mean for unmerged
    tokens).

    The windows are :func:`mmtok.compressors.uniform.grid_windows`: with an ``(H, W)`` grid and ``k``
    matching it (576 -> 144 = 12 x 12) they are the ``s x s`` windows of ``avg_pool2d`` with stride ``s``.
    When ``k`` does not divide the grid, the rows of windows (band heights differing by at most one row)
    hold ``k // kh`` or ``k // kh + 1`` windows each, with edges at ``floor(j * W / c)`` (widths in a band
    differing by at most one column), so the output has exactly ``k`` tokens and no window is empty. A
    ``(T, H, W)`` grid is first cut into ``min(T, k)`` bands of frames that share the ``k`` windows (with
    a per-frame budget each frame is pooled on its own). Without a grid it is 1-D pooling over ``k`` runs
    of consecutive raster indices. Each window is represented (its position) by its middle token.

    LLaVolta's in-LLM placement and training schedule are not reproduced here: the plan is applied where
    the pipeline runs it (``vision`` or ``pre_llm`` stage), training-free.
    """

    paper = (
        "LLaVolta: Efficient Large Multi-modal Models via Visual Context Compression "
        "(Chen et al., NeurIPS 2024)"
    )
    stage = "pre_llm"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video", "audio")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Assign each token to its window (``assign [n]``), represented by the window's middle token."""
        window, centre = grid_windows(row.n, k, row.grid)
        device = row.features.device
        return RowPlan(centre.to(device), window.to(device))
