"""Token budgets: how many tokens each row (or each frame / crop of a row) keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch

from mmtok.core.tokens import VisualTokens

PER = ("item", "frame", "crop")
ALLOCATION = ("fixed", "adaptive")


@dataclass(frozen=True)
class Budget:
    """A token budget with an allocation rule.

    Args:
        value: an int (tokens) or a float in (0, 1] (fraction of the tokens).
        per: ``"item"``: the value applies to the whole row (an image, a video, a clip).
            ``"frame"`` / ``"crop"``: the value applies to each segment of the row: the frames of a
            ``(T, H, W)`` grid, or the segments the adapter declared (AnyRes crops, audio chunks).
        allocation: ``"fixed"``: every segment gets the value. ``"adaptive"``: the row's total (value
            times the number of segments) is shared across segments in proportion to their mean
            importance (``signals["importance"]`` if given, else ``cls_attn``), GlobalCom2-style; each
            segment keeps at least ``min_per_segment`` and at most all of its tokens.
        min_per_segment: lower bound per segment for adaptive allocation.

    Examples:
        ``Budget(64)`` is the same as the int ``64``; ``Budget(16, per="frame")`` keeps 16 tokens in
        every frame; ``Budget(0.1, per="crop", allocation="adaptive")`` keeps 10 % of an AnyRes image,
        more in the crops the thumbnail attends to.
    """

    value: int | float
    per: Literal["item", "frame", "crop"] = "item"
    allocation: Literal["fixed", "adaptive"] = "fixed"
    min_per_segment: int = 1

    def __post_init__(self) -> None:
        _check_value(self.value)
        if self.per not in PER:
            raise ValueError(f"Budget.per must be one of {PER}, got {self.per!r}")
        if self.allocation not in ALLOCATION:
            raise ValueError(f"Budget.allocation must be one of {ALLOCATION}, got {self.allocation!r}")
        if self.allocation == "adaptive" and self.per == "item":
            raise ValueError(
                "Budget(allocation='adaptive') shares a budget across segments: set per='frame' or 'crop'"
            )
        if self.min_per_segment < 0:
            raise ValueError(f"Budget.min_per_segment must be >= 0, got {self.min_per_segment}")


BudgetLike = Union[int, float, Budget]  # noqa: UP007 (a runtime alias, py3.10-safe)


def _check_value(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"a budget must be an int, a float in (0, 1] or mmtok.Budget, got {type(value).__name__}"
        )
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"a fractional budget must be in (0, 1], got {value}")
    elif value < 1:
        raise ValueError(f"a token budget must be >= 1, got {value}")


def as_budget(budget: BudgetLike) -> Budget:
    """Normalise an int, float or :class:`Budget` to a :class:`Budget`."""
    if isinstance(budget, Budget):
        return budget
    _check_value(budget)
    return Budget(budget)


def count_for(value: int | float, n: int, where: str) -> int:
    """Tokens to keep out of ``n`` for an int or fractional budget value.

    Raises:
        ValueError: if an int budget exceeds ``n``.
    """
    if isinstance(value, float):
        return max(1, min(n, int(math.floor(value * n + 0.5))))
    if value > n:
        raise ValueError(
            f"budget {value} is larger than the {n} tokens of {where}; use at most {n} or a fraction"
        )
    return int(value)


def segment_counts(budget: BudgetLike, tokens: VisualTokens) -> list[list[tuple[int, int]]]:
    """Resolve a budget to per-row lists of ``(segment_length, tokens_to_keep)``.

    A ``per="item"`` budget yields one segment per row (the whole row).

    Returns:
        For each row, ``[(n_s, k_s), ...]`` in segment order, with ``1 <= k_s <= n_s`` except for
        adaptive allocation with ``min_per_segment=0``, where ``k_s`` may be 0.
    """
    bud = as_budget(budget)
    out = []
    for b in range(tokens.batch_size):
        n = int(tokens.lengths[b])
        if bud.per == "item":
            out.append([(n, count_for(bud.value, n, f"row {b}"))])
            continue
        segs = tokens.segments_of(b)
        if len(segs) == 1 and tokens.segments is None and bud.per == "frame":
            g = tokens.grid_of(b)
            raise ValueError(
                f"Budget(per='frame') needs a (T, H, W) grid or segments; row {b} has grid {g} and no segments"
            )
        fixed = [count_for(bud.value, s, f"segment {j} of row {b}") for j, s in enumerate(segs)]
        if bud.allocation == "fixed":
            out.append(list(zip(segs, fixed, strict=True)))
        else:
            out.append(
                list(zip(segs, _adaptive(tokens, b, segs, sum(fixed), bud.min_per_segment), strict=True))
            )
    return out


def _adaptive(tokens: VisualTokens, b: int, segs: list[int], total: int, floor: int) -> list[int]:
    """Share ``total`` across segments in proportion to mean importance (largest-remainder rounding)."""
    if "importance" in tokens.signals:
        imp = tokens.signals["importance"][b]
    elif tokens.cls_attn is not None:
        imp = tokens.cls_attn[b]
    else:
        raise ValueError(
            "Budget(allocation='adaptive') needs a per-token importance: pass signals={'importance': [B, N]} "
            "or cls_attn"
        )
    bounds = torch.tensor([0, *segs]).cumsum(0).tolist()
    score = torch.stack([imp[bounds[j] : bounds[j + 1]].float().mean() for j in range(len(segs))]).clamp(
        min=0
    )
    score = score / score.sum() if float(score.sum()) > 0 else torch.full_like(score, 1.0 / len(segs))
    lo = [min(floor, s) for s in segs]
    spare = total - sum(lo)
    if spare < 0:
        raise ValueError(
            f"adaptive budget {total} is below min_per_segment x segments ({sum(lo)}) in row {b}"
        )
    counts = list(lo)
    cap = torch.tensor([s - c for s, c in zip(segs, counts, strict=True)], dtype=torch.float64)
    share = score.double().cpu()
    # Water-filling: share the remainder by score, redistributing what capped segments cannot take.
    while spare > 0 and float(cap.sum()) > 0:
        active = cap > 0
        w = torch.where(active, share, torch.zeros_like(share))
        w = w / w.sum() if float(w.sum()) > 0 else active.double() / active.sum()
        ideal = torch.minimum(w * spare, cap)
        give = ideal.floor()
        left = spare - int(give.sum())
        if left > 0:
            rem = torch.where(cap - give > 0, ideal - give, torch.full_like(give, -1.0))
            for j in torch.argsort(rem, descending=True, stable=True)[:left].tolist():
                if cap[j] - give[j] > 0:
                    give[j] += 1
        if int(give.sum()) == 0:
            j = int(torch.argmax(torch.where(cap > 0, w, torch.full_like(w, -1.0))))
            give[j] = 1
        for j in range(len(segs)):
            counts[j] += int(give[j])
        cap -= give
        spare -= int(give.sum())
    return counts
