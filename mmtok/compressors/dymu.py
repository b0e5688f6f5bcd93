"""``dymu``: DyMU's dynamic token merging, DToMe (Wang et al., CVPR 2025): fewer tokens for simpler images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.tome import (
    MergeGroups,
    bipartite_step,
    check_budget,
    check_protected,
    merge_top_edges,
)
from mmtok.core import RowPlan, TokenRow
from mmtok.kernels import best_match


def calibrate_threshold(
    features: torch.Tensor, r: int, *, mask: torch.Tensor | None = None, protected: int = 0
) -> float:
    """DyMU's threshold calibration: the batch average of each image's ``r``-th largest edge score.

    DyMU (Wang et al., CVPR 2025, DToMe) fixes the threshold of each layer on a calibration set so
    that on average ``r`` tokens merge there: run ToMe's bipartite matching (alternating A/B split,
    each A token's best cosine match in B) on every image, take the ``r``-th largest edge score of
    each, and average over the batch. This applies that rule to the first merging round of
    :class:`DyMU` (the tokens as given).

    Args:
        features: ``[B, N, C]`` calibration tokens (the metric ``dymu`` will see, e.g. keys or features).
        r: merges wanted per image in one round, ``1 <= r <= |A|`` of every image.
        mask: ``[B, N]`` bool, valid tokens as a left-aligned prefix per row; all valid when None.
        protected: leading tokens left out of the matching, as the compressor's option.

    Returns:
        The threshold ``tau`` (a cosine similarity).

    Raises:
        ValueError: for a malformed batch, or ``r`` larger than an image's set A.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or min(features.shape) == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"calibrate_threshold expects features of shape [B, N, C], got {shape}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"calibrate_threshold: r must be an int >= 1, got {r!r}")
    check_protected("calibrate_threshold", protected)
    if mask is not None and tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"calibrate_threshold: mask must have shape {tuple(features.shape[:2])}, got {tuple(mask.shape)}")
    lengths = mask.sum(1).tolist() if mask is not None else [features.shape[1]] * features.shape[0]
    scores = []
    for b, n in enumerate(lengths):
        x = features[b, protected : int(n)].float()
        a, bb = x[0::2], x[1::2]
        if a.shape[0] < r or bb.shape[0] == 0:
            raise ValueError(
                f"calibrate_threshold: image {b} has {a.shape[0]} tokens in set A "
                f"({int(n)} tokens, protected={protected}); r={r} is too large"
            )
        _, s = best_match(a.unsqueeze(0), bb.unsqueeze(0))
        scores.append(torch.topk(s[0], r).values[-1])
    return float(torch.stack(scores).mean())


@register("dymu")
@dataclass
class DyMU(Compressor):
    """DToMe: merge every bipartite edge more similar than a threshold, so the count follows content.

    Implements the Dynamic Token Merging (DToMe) part of Wang et al., "DyMU: Dynamic Merging and
    Virtual Unmerging for Efficient VLMs", CVPR 2025: ToMe's bipartite soft matching
    (alternating A/B split, each A token's best cosine match in B, size-weighted merging, see
    ``tome``), except that instead of a fixed ``r`` every edge whose similarity exceeds the threshold
    ``tau`` merges. A simple image (many near-duplicate tokens) therefore loses many tokens, a
    complex one few. The paper runs one thresholded round per encoder layer; mmtok repeats rounds on
    the encoder output (on the merged tokens' size-weighted metrics) while any edge exceeds ``tau``.
    The budget is a ceiling: if more than ``k`` tokens remain, ToMe rounds (the most similar edges
    first) continue to exactly ``k``; so the output count is ``min(threshold result, k)``. Virtual
    token unmerging (VTU) belongs to the LLM side and is not part of this plan; the plan's
    ``sizes`` and ``assign`` carry what it needs.

    Representatives: ``keep[j]`` is the destination token of each group, as in ``tome``.

    Options:
        threshold: ``tau``, a cosine similarity; edges above it merge. The paper calibrates one per
            layer on data (:func:`calibrate_threshold`: the batch average of the ``r``-th largest edge
            score). Default 0.9, model-agnostic and conservative: two tokens above 0.9 differ by less
            than about 26 degrees, so only near-duplicates (flat backgrounds, repeated texture) merge
            and detailed images stay near the budget. Calibrate for a given model and target.
        protected: the first ``protected`` tokens of each row (or segment) are never merged. Default 0.
    """

    paper = "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs (Wang et al., CVPR 2025)"
    stage = "pre_llm"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video")
    adaptive = True

    threshold: float = 0.9
    protected: int = 0

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"dymu: threshold must be a finite number (a cosine similarity), got {t!r}")
        check_protected("dymu", self.protected)

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Thresholded merging rounds while any edge exceeds ``tau``, then ToMe rounds down to ``k``."""
        p = check_budget("dymu", min(self.protected, row.n), k)
        groups = MergeGroups.start(row)
        while groups.count - p >= 2:
            a, b, score = bipartite_step(groups, p)
            hit = score > self.threshold
            if not bool(hit.any()):
                break
            groups.merge(a[hit], b[hit])
        while groups.count > k:
            merge_top_edges(groups, p, groups.count - k)
        return groups.plan()
