"""``visionzip``: dominant tokens by CLS attention plus contextual tokens merged by similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.cls_attn import top_by_score
from mmtok.core import RowPlan, TokenRow
from mmtok.kernels import best_match


@register("visionzip")
@dataclass
class VisionZip(Compressor):
    """VisionZip's dominant-token selection and contextual-token merging, at exactly ``k`` outputs.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
    (training-free setting):

    1. *Dominant tokens*: the ``k_d`` tokens with the highest CLS attention (``row.cls_attn``, the
       paper's penultimate-layer CLS attention summed over heads) are kept as they are.
    2. *Contextual tokens*: the remaining ``R`` tokens, in raster order, are split into ``k_c`` targets
       taken uniformly (every ``max(1, R // k_c)``-th of them, the first ``k_c``) and the rest. Each
       non-target token joins the target it is most cosine-similar to under ``row.metric`` (the paper
       uses the attention keys of that layer; the features when the adapter gives no metric), ties to
       the earlier target.

    The split is ``k_c = max(1, round(k * contextual_ratio))``, ``k_d = k - k_c``; the default
    ``contextual_ratio = 10 / 64`` is the paper's 54 + 10 split of 64 tokens (108 + 20 of 128, 162 + 30
    of 192). At least one contextual token is kept so that every input token ends up in some output
    (the output sizes sum to ``N``).

    A contextual token here is the size-weighted mean of its target and the tokens merged into it (the
    plan's merge). The authors' released code instead adds the target to the mean of its merged tokens
    (``target + mean(members)``), which a plan of weighted means cannot express; the grouping, and
    hence which tokens each output summarises, is the same.

    Args:
        contextual_ratio: share of the budget given to contextual (merged) tokens, in ``(0, 1]``.
    """

    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., CVPR 2025)"
    stage = "vision"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video")
    requires = frozenset({"cls_attn"})

    contextual_ratio: float = 10 / 64

    def __post_init__(self) -> None:
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise ValueError(f"visionzip: contextual_ratio must be a number in (0, 1], got {r!r}")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Dominant tokens keep their own slots; every other token is assigned to a contextual target."""
        device = row.features.device
        n_ctx = min(k, max(1, math.floor(k * self.contextual_ratio + 0.5)))
        n_dom = k - n_ctx
        dominant = top_by_score(row.cls_attn, n_dom)
        is_rest = torch.ones(row.n, dtype=torch.bool, device=device)
        is_rest[dominant] = False
        rest = is_rest.nonzero().flatten()
        step = max(1, rest.numel() // n_ctx)
        targets = rest[::step][:n_ctx]
        is_other = is_rest.clone()
        is_other[targets] = False
        others = is_other.nonzero().flatten()

        assign = torch.empty(row.n, dtype=torch.long, device=device)
        assign[dominant] = torch.arange(n_dom, device=device)
        assign[targets] = torch.arange(n_dom, k, device=device)
        if others.numel():
            metric = row.metric
            nearest, _ = best_match(metric[others].unsqueeze(0), metric[targets].unsqueeze(0))
            assign[others] = n_dom + nearest[0]
        return RowPlan(torch.cat([dominant, targets]), assign)
