"""Core data model and pure-torch primitives (the reference implementations of the kernels)."""

from mmtok.core.budget import Budget, BudgetLike, as_budget, segment_counts
from mmtok.core.kcenter import kcenter
from mmtok.core.matching import best_match
from mmtok.core.merge import merge_tokens
from mmtok.core.plan import RowPlan, TokenPlan
from mmtok.core.similarity import cosine_matrix, normalize
from mmtok.core.tokens import TokenRow, VisualTokens

__all__ = [
    "Budget",
    "BudgetLike",
    "RowPlan",
    "TokenPlan",
    "TokenRow",
    "VisualTokens",
    "as_budget",
    "best_match",
    "cosine_matrix",
    "kcenter",
    "merge_tokens",
    "normalize",
    "segment_counts",
]
