"""``vispruner``: important tokens by CLS attention, then diverse tokens by iterative duplicate removal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.cls_attn import top_by_score
from mmtok.core import RowPlan, TokenRow, cosine_matrix
from mmtok.kernels import best_match

# Up to this many candidates, their pairwise similarities are computed once (at most 576 MiB in float32)
# instead of once per round; past it each round matches its two halves afresh.
_CACHE_LIMIT = 12288


def remove_duplicates(features: torch.Tensor, order: torch.Tensor, keep: int, step: int) -> torch.Tensor:
    """VisPruner's diverse-token search: drop near-duplicates from ``order`` until ``keep`` remain.

    Each round splits the current list alternately into ``A = order[0::2]`` and ``B = order[1::2]``,
    scores every token of ``A`` by its highest cosine similarity to ``B``, and removes the
    ``r = min(step, len - keep)`` most similar ones from ``A`` (ties: the earlier one goes first). The
    survivors of ``A`` (least similar first) followed by ``B`` form the next list.

    Args:
        features: ``[n, C]`` token features.
        order: ``[m]`` long candidate indices, in their priority order (VisPruner: CLS attention, high first).
        keep: how many to keep, ``1 <= keep <= m``.
        step: most tokens removed per round (>= 1).

    Returns:
        ``[keep]`` long surviving indices, in the list's final order.
    """
    if order.numel() <= keep:
        return order
    cached = order.numel() <= _CACHE_LIMIT
    if cached:
        sim = cosine_matrix(features[order])
        pos = torch.empty(features.shape[0], dtype=torch.long, device=order.device)
        pos[order] = torch.arange(order.numel(), device=order.device)
    while order.numel() > keep:
        r = min(step, order.numel() - keep)
        a, b = order[0::2], order[1::2]
        if cached:
            score = sim.index_select(0, pos[a]).index_select(1, pos[b]).amax(dim=1)
        else:
            score = best_match(features[a].unsqueeze(0), features[b].unsqueeze(0))[1][0]
        survivors = a[torch.argsort(score, descending=True, stable=True)[r:]]
        order = torch.cat([survivors, b])
    return order


@register("vispruner")
@dataclass
class VisPruner(Compressor):
    """VisPruner: keep important tokens by CLS attention and diverse tokens from the rest.

    Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
    VLMs", ICCV 2025:

    1. *Important tokens*: the ``k_i = floor(k * important_ratio)`` tokens with the highest CLS
       attention of the vision encoder (``row.cls_attn``), ties to the lower index.
    2. *Diverse tokens*: the other tokens, in descending CLS-attention order, go through iterative
       similarity-based duplicate removal (:func:`remove_duplicates`): each round pairs the list's
       alternate halves and removes up to ``step`` tokens whose best cosine match in the other half is
       highest, until ``k - k_i`` remain. Similarity is measured on the visual features (``row.features``),
       as in the paper.

    The defaults (half the budget important, at most 8 removals per round) are those of the authors'
    released code.

    Args:
        important_ratio: share of the budget kept by CLS attention, in ``[0, 1]``.
        step: most tokens removed per duplicate-removal round (``>= 1``).
    """

    paper = (
        "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs "
        "(VisPruner, Zhang et al., ICCV 2025)"
    )
    stage = "vision"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video")
    requires = frozenset({"cls_attn"})

    important_ratio: float = 0.5
    step: int = 8

    def __post_init__(self) -> None:
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {r!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"vispruner: step must be an int >= 1, got {self.step!r}")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Keep ``k_i`` important and ``k - k_i`` diverse tokens."""
        n_imp = int(k * self.important_ratio)
        order = top_by_score(row.cls_attn, row.n)
        important, residual = order[:n_imp], order[n_imp:]
        if n_imp == k:
            return RowPlan(important)
        diverse = remove_duplicates(row.features, residual, k - n_imp, self.step)
        return RowPlan(torch.cat([important, diverse]))
