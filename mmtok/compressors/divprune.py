"""``divprune``: keep the most diverse tokens, the greedy Max-Min Diversity solution of DivPrune."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow
from mmtok.kernels import kcenter


@register("divprune")
@dataclass
class DivPrune(Compressor):
    """Keep the ``k`` tokens that solve the Max-Min Diversity Problem (MMDP) greedily.

    Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025. Section 3 casts pruning as the MMDP, ``max_{S, |S|=k} min_{i != j in S} d(x_i, x_j)``
    with the cosine distance ``d = 1 - cos``, and Alg. 1 solves it greedily: the first token is the one
    whose nearest other token is farthest (``argmax_i min_{j != i} d``), then each step adds the token
    whose distance to its nearest kept token is largest. That is Gonzalez's farthest-point algorithm,
    :func:`mmtok.kernels.kcenter`, which runs the Triton kernel on CUDA and the torch reference
    (:func:`mmtok.core.kcenter`) elsewhere. Ties go to the smallest index.

    Distances are measured on ``row.metric`` (the features unless the adapter passes another space,
    e.g. the vision tower's keys). The method needs no signal besides the tokens, so it runs on vision
    tower outputs and projected features alike (the paper prunes the projected tokens before the LLM).
    """

    paper = (
        "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025)"
    )
    stage = "pre_llm"
    stages = ("vision", "pre_llm")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Greedy farthest-point selection of ``k`` of the row's ``n`` tokens (``[n, Cm]`` metric)."""
        chosen = kcenter(row.metric.unsqueeze(0), k)[0]
        return RowPlan(chosen.sort().values.to(row.features.device))
