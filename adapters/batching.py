"""Batching helpers shared by the adapters: padding items, left padding, per-row budgets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtok.core import Budget, VisualTokens, as_budget
from mmtok.core.budget import BudgetLike


class left_padding:  # noqa: N801 (used as a context manager, like contextlib's)
    """Context manager: the tokenizer pads on the left inside, as batched generation needs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.old = getattr(tokenizer, "padding_side", None)

    def __enter__(self) -> None:
        if self.old is not None:
            self.tokenizer.padding_side = "left"

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            self.tokenizer.padding_side = self.old


def pad_items(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_j, ...]`` tensors into ``[J, N, ...]`` (zeros past each row) and a ``[J, N]`` mask."""
    n = max(int(x.shape[0]) for x in items)
    ref = items[0]
    out = ref.new_zeros((len(items), n, *ref.shape[1:]))
    mask = torch.zeros(len(items), n, dtype=torch.bool, device=ref.device)
    for j, x in enumerate(items):
        out[j, : x.shape[0]] = x
        mask[j, : x.shape[0]] = True
    return out, mask


def same_budget(a: BudgetLike, b: BudgetLike) -> bool:
    """Whether two budgets are the same (an int 64 and a float 64.0 are not)."""
    return type(a) is type(b) and a == b


def row_tokens(tokens: VisualTokens, j: int) -> VisualTokens:
    """Row ``j`` of a batch as its own one-row :class:`VisualTokens`, padding cut."""
    n = int(tokens.lengths[j])

    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[j : j + 1, :n]

    text = tokens.text[j : j + 1] if tokens.text is not None else None
    text_mask = tokens.text_mask[j : j + 1] if tokens.text_mask is not None else None
    if text is not None and text_mask is not None:
        t = int(text_mask.sum())
        text, text_mask = text[:, :t], text_mask[:, :t]
    return VisualTokens(
        tokens.features[j : j + 1, :n],
        grid=tokens.grid_of(j),
        cls_attn=cut(tokens.cls_attn),
        text=text,
        text_mask=text_mask,
        metric=cut(tokens.metric),
        sizes=cut(tokens.sizes),
        segments=[tokens.segments[j]] if tokens.segments is not None else None,
        signals={k: v[j : j + 1, :n] for k, v in tokens.signals.items()},
    )


def resolve_budgets(budget: BudgetLike | Sequence[BudgetLike], batch: int) -> list[BudgetLike]:
    """One budget per prompt row.

    Args:
        budget: one budget for every prompt (int tokens, float fraction or :class:`mmtok.Budget`), or a
            list with one per prompt (ragged budgets).
        batch: number of prompts.

    Raises:
        ValueError / TypeError: a malformed budget or a list of the wrong length.
    """
    if isinstance(budget, (list, tuple)):
        if len(budget) != batch:
            raise ValueError(f"a list of budgets needs one per prompt ({batch}), got {len(budget)}")
        out = list(budget)
    else:
        out = [budget] * batch
    for b in out:
        if not isinstance(b, Budget):
            as_budget(b)
    return out
