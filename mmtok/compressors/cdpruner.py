"""``cdpruner``: keep the tokens of maximal conditional diversity, the greedy MAP of an instruction-conditioned DPP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow, cosine_matrix

# A greedy gain below this fraction of the largest kernel diagonal is treated as zero (float32 noise).
_ZERO_GAIN = 1e-5


@register("cdpruner")
@dataclass
class CDPruner(Compressor):
    """Greedy MAP inference of a DPP whose kernel is the token similarity conditioned on the instruction.

    Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
    in MLLMs" (CDPruner, NeurIPS 2025), Section 3:

    1. Similarity: ``S = cos(x_i, x_j)`` over the row's tokens (``[n, n]``, on ``row.metric``).
    2. Instruction relevance: ``r_i = mean_t cos(x_i, z_t)`` over the valid text tokens ``z``
       (``row.text``, already cut to ``text_mask``), min-max normalised to ``(0, 1]`` (a ``1e-6``
       offset keeps the least relevant token selectable, as in the authors' code).
    3. Conditional kernel: ``L = diag(r) S diag(r)``. With ``theta`` set, the relevance/diversity
       trade-off of Chen et al. is used instead: ``r <- exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``.
    4. Selection: ``argmax_{|Y| = k} det(L_Y)`` by the fast greedy MAP algorithm of Chen, Zhang and Zhou
       ("Fast Greedy MAP Inference for Determinantal Point Process", NeurIPS 2018, Alg. 1): an
       incremental Cholesky factor gives every candidate's marginal gain ``d_i^2`` in ``O(k n)`` per step.

    Exact budgets: ``L`` has rank at most ``min(n, C)``, so once the kept tokens span every other one
    (or the rest are duplicates) all gains are numerically zero and Alg. 1 would stop early. We then
    start a fresh greedy round over the tokens not yet kept (the Cholesky state is reset, the kept tokens
    stay excluded) and repeat until ``k`` tokens are kept: each round is again the most diverse,
    most relevant choice among what is left. Ties go to the smallest index.

    Attributes:
        theta: ``None`` (default, the paper's ``diag(r) S diag(r)`` kernel as in its released code) or a
            value in ``[0, 1)``: 0 ignores the instruction, values near 1 favour relevance.
        invert_relevance: use ``-cos`` as relevance before normalising. The authors' LLaVA-1.5 code
            does this because CLIP's patch/text similarity is inverted there; off by default.
    """

    paper = (
        "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs "
        "(CDPruner, Zhang et al., NeurIPS 2025)"
    )
    stage = "pre_llm"
    stages = ("pre_llm",)
    requires = frozenset({"text"})

    theta: float | None = None
    invert_relevance: bool = False

    def __post_init__(self) -> None:
        if self.theta is not None:
            if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
                raise TypeError(f"cdpruner: theta must be None or a float in [0, 1), got {self.theta!r}")
            if not 0.0 <= float(self.theta) < 1.0:
                raise ValueError(f"cdpruner: theta must be in [0, 1) (or None), got {self.theta}")

    def relevance(self, row: TokenRow) -> torch.Tensor:
        """``[n]`` float32 per-token weight ``r`` of the conditional kernel (steps 2-3 above).

        Raises:
            ValueError: if the row has no text.
        """
        if row.text is None:
            raise ValueError("cdpruner needs the prompt's text embeddings: pass VisualTokens(text=[B, T, C])")
        rel = cosine_matrix(row.features, row.text).mean(dim=1)
        if self.invert_relevance:
            rel = -rel
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min() + 1e-6)
        if self.theta is not None:
            alpha = float(self.theta) / (2.0 * (1.0 - float(self.theta)))
            rel = torch.exp(alpha * rel)
        return rel

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Greedy MAP of the conditional DPP over the row's ``n`` tokens, exactly ``k`` kept."""
        rel = self.relevance(row)
        kernel = rel.unsqueeze(1) * cosine_matrix(row.metric) * rel.unsqueeze(0)
        keep = greedy_dpp_map(kernel, k)
        return RowPlan(keep.sort().values.to(row.features.device))


def greedy_dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Chen et al. (NeurIPS 2018) Alg. 1 with restarts, so that exactly ``k`` items are selected.

    Args:
        kernel: ``[n, n]`` symmetric positive semi-definite DPP kernel ``L``.
        k: items to select, ``1 <= k <= n``.

    Returns:
        ``[k]`` long indices in selection order.
    """
    n = kernel.shape[0]
    if kernel.dim() != 2 or kernel.shape[1] != n:
        raise ValueError(f"greedy_dpp_map expects a square [n, n] kernel, got {tuple(kernel.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"greedy_dpp_map: k must be in [1, n={n}], got {k}")
    kernel = kernel.float()
    diag = kernel.diagonal().clone()
    zero = _ZERO_GAIN * max(float(diag.max()), torch.finfo(torch.float32).tiny)
    d2 = diag.clone()
    factors = kernel.new_zeros(k, n)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    chosen = torch.empty(k, dtype=torch.long, device=kernel.device)
    start = 0
    for i in range(k):
        gains = d2.masked_fill(taken, float("-inf"))
        j = int(gains.argmax())
        if float(gains[j]) <= zero and i > start:
            # The kept set spans the rest: start a new round over what is left (see CDPruner docstring).
            start, d2 = i, diag.clone()
            gains = d2.masked_fill(taken, float("-inf"))
            j = int(gains.argmax())
        chosen[i] = j
        taken[j] = True
        dj = float(d2[j])
        if dj > zero:
            e = (kernel[j] - factors[start:i, j] @ factors[start:i]) / math.sqrt(dj)
            factors[i] = e
            d2 = d2 - e.square()
    return chosen
