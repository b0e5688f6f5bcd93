"""``coverage``: MMTok's multimodal coverage maximisation (text->vision and vision->vision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow, cosine_matrix


@register("coverage")
@dataclass
class Coverage(Compressor):
    """Keep the ``k`` tokens that best cover both the prompt's text tokens and all the vision tokens.

    Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (2025,
    ICLR 2026). Token selection is a maximum-coverage problem with the facility-location objective

    ``f(S) = sum_{t in text} max_{j in S} P[t, j] + alpha * sum_{i in vision} max_{j in S} Q[i, j]``

    where ``P = softmax_j(cos(z_t, x_j) / tau_text) / m`` is the text->vision coverage of the ``m``
    valid text tokens (``row.text``, already cut to ``text_mask``; cosine against ``row.features``,
    the space the text lives in) and ``Q = softmax_j(cos(x_i, x_j) / tau_vision) / n`` the
    vision->vision coverage of the ``n`` tokens (on ``row.metric``). Each softmax runs over the
    candidate vision tokens ``j``, so every covered item spreads one unit of mass over its candidates.
    ``f`` is monotone submodular, so the greedy algorithm (add the token of largest marginal gain
    ``sum_r max(0, C[r, j] - best[r])`` over the rows of ``C = [P; alpha Q]``) is within ``1 - 1/e`` of
    the optimum. Every candidate's gain is kept in a vector and, after each pick, corrected only for the
    items whose best coverage that pick improved (the same choices as recomputing all gains, ~10x less
    work at ``n = 2880``). A token is added at every step, so the budget is exact; ties go to the
    smallest index, up to float rounding once every gain is zero.

    Defaults (``alpha = 0.5``, ``tau_text = 0.02``, ``tau_vision = 0.2``) are those of the authors'
    released implementation (Apache-2.0). The paper's optional VLM agent that rewrites the prompt into
    better text tokens lives outside the compressor: whatever text embeddings the adapter passes are used.

    Attributes:
        alpha: weight of the vision->vision coverage against the text->vision coverage.
        text_temperature: softmax temperature of the text->vision similarities.
        vision_temperature: softmax temperature of the vision->vision similarities.
    """

    paper = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (Dong et al., 2025)"
    stage = "pre_llm"
    stages = ("pre_llm",)
    requires = frozenset({"text"})

    alpha: float = 0.5
    text_temperature: float = 0.02
    vision_temperature: float = 0.2

    def __post_init__(self) -> None:
        for name in ("alpha", "text_temperature", "vision_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"coverage: {name} must be a number, got {value!r}")
        if self.alpha < 0:
            raise ValueError(f"coverage: alpha must be >= 0, got {self.alpha}")
        if self.text_temperature <= 0 or self.vision_temperature <= 0:
            raise ValueError(
                "coverage: temperatures must be > 0, got "
                f"text_temperature={self.text_temperature}, vision_temperature={self.vision_temperature}"
            )

    def coverage_matrix(self, row: TokenRow) -> torch.Tensor:
        """``[m + n, n]`` float32 ``C = [P; alpha Q]``: how much each candidate (column) covers each item.

        Raises:
            ValueError: if the row has no text.
        """
        if row.text is None:
            raise ValueError("coverage needs the prompt's text embeddings: pass VisualTokens(text=[B, T, C])")
        m, n = row.text.shape[0], row.n
        p = torch.softmax(cosine_matrix(row.text, row.features) / self.text_temperature, dim=1) / m
        q = torch.softmax(cosine_matrix(row.metric) / self.vision_temperature, dim=1) / n
        return torch.cat([p, q * float(self.alpha)], dim=0)

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Greedy coverage maximisation over the row's ``n`` tokens, exactly ``k`` kept."""
        cover = self.coverage_matrix(row)
        best = cover.new_zeros(cover.shape[0])
        gain = cover.sum(dim=0)
        taken = torch.zeros(row.n, dtype=torch.bool, device=cover.device)
        chosen = torch.empty(k, dtype=torch.long, device=cover.device)
        for i in range(k):
            j = gain.masked_fill(taken, float("-inf")).argmax()
            chosen[i] = j
            taken[j] = True
            col = cover.index_select(1, j.view(1)).squeeze(1)
            # Only the items the new token covers better change their best; update their share of every gain.
            rows = (col > best).nonzero().flatten()
            part = cover.index_select(0, rows)
            old = (part - best[rows].unsqueeze(1)).clamp_min_(0).sum(dim=0)
            gain -= old - (part - col[rows].unsqueeze(1)).clamp_min_(0).sum(dim=0)
            best[rows] = col[rows]
        return RowPlan(chosen.sort().values.to(row.features.device))
