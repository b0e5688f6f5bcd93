"""``cls_attn``: keep the ``k`` tokens the vision tower's CLS token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow


def top_by_score(score: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` indices of the largest ``score`` values, best first, ties to the lower index.

    Args:
        score: ``[n]`` floating-point scores (any float dtype; compared in float32).
        k: how many to take, ``0 <= k <= n``.
    """
    return torch.argsort(score.float(), descending=True, stable=True)[:k]


@register("cls_attn")
@dataclass
class ClsAttn(Compressor):
    """Top-``k`` tokens by the attention they receive from the vision encoder's CLS token.

    The token-wise selection of FoPru (Jiang et al., "FoPru: Focal Pruning for Efficient Large
    Vision-Language Models", 2024), which ranks visual tokens by the CLS attention of the vision
    encoder's output layer and keeps the top ones; it is also the selection step of LLaVA-PruMerge
    (Shang et al., 2024), which keeps the CLS-attention outliers (there chosen by an IQR rule, here the
    ``k`` highest) before merging. ``row.cls_attn`` is that score (for towers without a CLS token the
    adapter supplies the mean attention over queries). Ties go to the lower token index.
    """

    paper = "FoPru: Focal Pruning for Efficient Large Vision-Language Models (Jiang et al., 2024)"
    stage = "vision"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video")
    requires = frozenset({"cls_attn"})

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Keep ``top_by_score(cls_attn, k)``."""
        return RowPlan(top_by_score(row.cls_attn, k))
