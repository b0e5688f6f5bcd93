"""``random``: keep a uniformly random subset of tokens (a baseline every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow


@register("random")
@dataclass
class RandomPrune(Compressor):
    """Keep ``k`` tokens drawn uniformly without replacement, reproducibly from ``seed``.

    The random-pruning baseline used across the token-reduction literature (e.g. the "random" rows
    of FastV, ECCV 2024, and DivPrune, CVPR 2025).
    """

    paper = "baseline (uniform random subset)"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video", "audio")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Draw ``k`` distinct indices with the seeded CPU generator."""
        keep = torch.randperm(row.n, generator=generator)[:k]
        return RowPlan(keep.to(row.features.device))
