"""``identity``: keep every token (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenPlan, TokenRow, VisualTokens
from mmtok.core.budget import BudgetLike, segment_counts


@register("identity")
@dataclass
class Identity(Compressor):
    """Keep all tokens, whatever the budget: the reference every method is compared against.

    The budget is still validated (so a budget of 0 or larger than the tokens is an error, as for every
    method), then ignored.
    """

    paper = "baseline (no compression)"
    stages = ("vision", "pre_llm", "llm")
    modalities = ("image", "video", "audio")
    honours_budget = False

    def __call__(self, tokens: VisualTokens, budget: BudgetLike) -> TokenPlan:
        """Plan that keeps every valid token of every row."""
        if not isinstance(tokens, VisualTokens):
            raise TypeError(f"identity expects mmtok.VisualTokens, got {type(tokens).__name__}")
        segment_counts(budget, tokens)
        dev = tokens.features.device
        rows = [RowPlan(torch.arange(int(n), device=dev)) for n in tokens.lengths]
        return TokenPlan.from_rows(rows, tokens.num_tokens, tokens.sizes)

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Keep every token of the row."""
        return RowPlan(torch.arange(row.n, device=row.features.device))
