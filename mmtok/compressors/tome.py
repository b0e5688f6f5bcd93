"""``tome``: Token Merging by bipartite soft matching (Bolya et al., ICLR 2023), iterated to a budget.

This module also holds the pieces the ToMe family shares (``pitome``, ``dymu``): :class:`MergeGroups`,
which tracks which original tokens each merged token stands for through repeated merges, and
:func:`bipartite_step`, one round of ToMe's matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow
from mmtok.kernels import best_match


@dataclass
class MergeGroups:
    """The merged tokens of one row while merging proceeds, ordered by representative index.

    Each group is represented by the original token that has always been a merge destination (the
    token the others were merged into), so ``rep`` stays ascending when groups disappear. Group
    metrics are size-weighted means of their members' metrics, as ToMe's ``merge_wavg`` averages
    tokens by size.

    Attributes:
        assign: ``[n]`` long, the current group of every original token.
        rep: ``[m]`` long, the representative original token of each group, ascending.
        metric: ``[m, Cm]`` float32, size-weighted mean metric of each group.
        size: ``[m]`` float32, summed input sizes of each group.
    """

    assign: torch.Tensor
    rep: torch.Tensor
    metric: torch.Tensor
    size: torch.Tensor

    @classmethod
    def start(cls, row: TokenRow) -> MergeGroups:
        """Every token in its own group, with the row's metric and sizes."""
        idx = torch.arange(row.n, device=row.features.device)
        return cls(idx, idx.clone(), row.metric.float(), row.size_weights().to(row.features.device))

    @property
    def count(self) -> int:
        """Number of groups ``m``."""
        return int(self.rep.numel())

    def merge(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Merge the groups ``src[i]`` into ``dst[i]``.

        Args:
            src: ``[r]`` long, distinct groups that disappear.
            dst: ``[r]`` long, the groups they join; none of them is in ``src`` (several may repeat).
        """
        w = self.size
        size = w.clone()
        size.index_add_(0, dst, w[src])
        # Only the destinations' means change: sum their members in a small [len(d), Cm] block.
        d, slot = torch.unique(dst, return_inverse=True)
        acc = self.metric[d] * w[d].unsqueeze(-1)
        acc.index_add_(0, slot, self.metric[src] * w[src].unsqueeze(-1))
        alive = torch.ones(self.count, dtype=torch.bool, device=w.device)
        alive[src] = False
        redirect = torch.arange(self.count, device=w.device)
        redirect[src] = dst
        new_pos = alive.long().cumsum(0) - 1
        keep = alive.nonzero().squeeze(1)
        self.assign = new_pos[redirect[self.assign]]
        self.rep = self.rep[keep]
        self.size = size[keep]
        self.metric = self.metric[keep]
        self.metric[new_pos[d]] = acc / size[d].unsqueeze(-1)

    def plan(self) -> RowPlan:
        """The row plan: one output slot per group, represented by its destination token."""
        return RowPlan(self.rep, self.assign)


def check_protected(name: str, protected: int) -> None:
    """Validate a ``protected`` option (the number of leading tokens that are never merged)."""
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise ValueError(f"{name}: protected must be an int >= 0 (leading tokens never merged), got {protected!r}")


def check_step_fraction(name: str, step_fraction: float, upper: float = 0.5) -> None:
    """Validate a ``step_fraction`` option: a number in ``(0, upper]``."""
    if isinstance(step_fraction, bool) or not isinstance(step_fraction, (int, float)):
        raise TypeError(f"{name}: step_fraction must be a float in (0, {upper}], got {type(step_fraction).__name__}")
    if not 0.0 < float(step_fraction) <= upper:
        raise ValueError(f"{name}: step_fraction must be in (0, {upper}], got {step_fraction}")


def check_budget(name: str, protected: int, k: int) -> int:
    """The number of protected tokens, checking that the budget leaves room for one merged group.

    Raises:
        ValueError: if ``k <= protected``: the protected tokens alone would fill the budget.
    """
    if k <= protected:
        raise ValueError(
            f"{name}: a budget of {k} tokens leaves no room to merge beside protected={protected} tokens; "
            f"use a budget of at least {protected + 1} per row (or segment) or lower protected"
        )
    return protected


def bipartite_step(groups: MergeGroups, protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching on the current groups (Sec. 3, steps 1-2).

    The unprotected groups, in representative order, alternate between set A (even positions) and
    set B (odd positions); every A group is joined by an edge to its most cosine-similar B group.

    Args:
        groups: the current groups; at least two are unprotected.
        protected: the leading groups that take no part (never in A, never a destination in B).

    Returns:
        ``(a, b, score)``: ``[|A|]`` group indices of A, ``[|A|]`` the group in B each one matches and
        ``[|A|]`` float32 the cosine similarity of that edge.
    """
    cand = torch.arange(protected, groups.count, device=groups.rep.device)
    a, b = cand[0::2], cand[1::2]
    idx, score = best_match(groups.metric[a].unsqueeze(0), groups.metric[b].unsqueeze(0))
    return a, b[idx[0]], score[0]


def merge_top_edges(groups: MergeGroups, protected: int, r: int) -> None:
    """Run one bipartite round and merge its ``r`` most similar edges (ties: lower A position first)."""
    a, b, score = bipartite_step(groups, protected)
    order = torch.sort(score, descending=True, stable=True).indices[: min(r, a.numel())]
    groups.merge(a[order], b[order])


@register("tome")
@dataclass
class ToMe(Compressor):
    """Token Merging: bipartite soft matching, repeated until exactly ``k`` tokens remain.

    Implements the matching of Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3
    ("Bipartite Soft Matching"): (1) split the tokens into sets A and B by alternating positions;
    (2) draw one edge from each A token to its most similar B token (cosine similarity on
    ``row.metric``: the attention keys where the adapter supplies them, as in the paper, else the
    features); (3) keep the ``r`` most similar edges; (4) merge each connected A token into its B
    token by size-weighted mean (``merge_wavg``); (5) concatenate. The paper runs one round per
    transformer layer; mmtok runs rounds on the encoder's output, each on the tokens merged so far
    (their metrics are the size-weighted means of their members), with
    ``r = min(|A|, ceil(step_fraction * unprotected), tokens - k)`` until ``k`` remain. Groups are
    tracked through the rounds so that ``assign`` maps each original token to its final output.

    Sizes: ``row.sizes`` (tokens already merged upstream) weight every mean, and the plan's
    ``sizes`` are the summed sizes of each output, which adapters may add as ``log s`` to attention
    (the paper's proportional attention, Eq. 1).

    Representatives: ``keep[j]`` is the token that stayed a destination through every round (the B
    token the others merged into), so positions of merged tokens follow their destination.

    Order: the alternating split is taken over the surviving tokens in original (raster) order.
    The authors' code instead concatenates unmerged A tokens (sorted by edge score) before B, which
    changes the next round's alternation; keeping raster order keeps the split spatial.

    Options:
        protected: the first ``protected`` tokens of each row (or segment, with per-frame budgets) are
            never merged: not in A and never a destination in B. The paper protects the class token
            this way (its score row is set to -inf and it is not in B). Default 0: no CLS among
            pre-LLM visual tokens.
        step_fraction: at most this share of the unprotected tokens is merged per round, in (0, 0.5].
            Default 0.5: ToMe's own maximum (every A token may merge, ``r <= |A|``), the fewest rounds.
    """

    paper = "Token Merging: Your ViT But Faster (Bolya et al., ICLR 2023)"
    stage = "pre_llm"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video", "audio")

    protected: int = 0
    step_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_protected("tome", self.protected)
        check_step_fraction("tome", self.step_fraction)

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Merge rounds of bipartite soft matching until ``k`` groups remain."""
        p = check_budget("tome", min(self.protected, row.n), k)
        groups = MergeGroups.start(row)
        while groups.count > k:
            free = groups.count - p
            r = min(max(1, math.ceil(self.step_fraction * free)), groups.count - k)
            merge_top_edges(groups, p, r)
        return groups.plan()
