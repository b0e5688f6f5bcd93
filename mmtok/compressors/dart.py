"""``dart``: Duplication-Aware Reduction of Tokens: keep pivots and the tokens least duplicated with them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow, cosine_matrix

SELECTIONS = ("per_pivot", "global")


@register("dart")
@dataclass
class Dart(Compressor):
    """Keep a few pivot tokens, then the tokens least duplicated with the pivots.

    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART, EMNLP 2025), Section 3:

    1. Pivots: the ``pivots`` vision tokens of largest ``||k_i||_p`` (the paper's K-norm, L1 by default),
       where ``k`` is ``row.signals["keys"]`` when the adapter passes the key states of the layer, else
       the token features. When the row has text, the ``text_pivots`` text tokens of largest norm are
       pivots too (they select vision tokens but are not kept: they are in the prompt anyway).
    2. Duplication: ``dup(p, x_j) = cos(p, x_j)``, on ``row.metric`` for vision pivots and on
       ``row.features`` (the space the text lives in) for text pivots.
    3. Retention: with ``selection="per_pivot"`` (the authors' algorithm), each pivot in turn (vision
       pivots by decreasing norm, then text pivots) adds its ``round(k / #pivots)`` least duplicated
       tokens among those not yet kept. Any slots still free (possible only when there are more text
       than vision pivots) go, like every slot under ``selection="global"``, to the tokens whose
       largest duplication with any pivot is smallest. Exactly ``k`` tokens are kept, ties to the
       smallest index.

    The paper applies DART inside the LLM after layer 2 (``stage="llm"``, on the hidden states, with the
    layer's keys for the pivots); the adapters hand those in. Here the default stage is ``"pre_llm"``,
    on the projected vision tokens, where it works on whatever features it is given.

    Attributes:
        pivots: vision pivot tokens (the authors' default 4), at most ``k``.
        text_pivots: text pivot tokens when the row has text (default 4); 0 ignores the text.
        norm_p: the ``p`` of the pivot norm (1, the L1 norm of the paper's code).
        selection: ``"per_pivot"`` (default, the paper) or ``"global"``.
    """

    paper = (
        "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
        "(DART, Wen et al., EMNLP 2025)"
    )
    stage = "pre_llm"
    stages = ("pre_llm", "llm")

    pivots: int = 4
    text_pivots: int = 4
    norm_p: float = 1.0
    selection: str = "per_pivot"

    def __post_init__(self) -> None:
        for name, low in (("pivots", 1), ("text_pivots", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"dart: {name} must be an int >= {low}, got {value!r}")
        if isinstance(self.norm_p, bool) or not isinstance(self.norm_p, (int, float)) or self.norm_p <= 0:
            raise ValueError(f"dart: norm_p must be a number > 0, got {self.norm_p!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"dart: selection must be one of {SELECTIONS}, got {self.selection!r}")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Pivots by norm, then the least duplicated tokens, exactly ``k`` of the row's ``n``."""
        keys = row.signals.get("keys", row.features)
        score = keys.float().reshape(row.n, -1).norm(p=float(self.norm_p), dim=-1)
        pivots = torch.argsort(score, descending=True, stable=True)[: min(self.pivots, k)]
        dup = cosine_matrix(row.metric[pivots], row.metric)
        if row.text is not None and self.text_pivots > 0:
            tscore = row.text.float().norm(p=float(self.norm_p), dim=-1)
            tpiv = torch.argsort(tscore, descending=True, stable=True)[: self.text_pivots]
            dup = torch.cat([dup, cosine_matrix(row.text[tpiv], row.features)], dim=0)
        taken = torch.zeros(row.n, dtype=torch.bool, device=score.device)
        taken[pivots] = True
        count = pivots.numel()
        if self.selection == "per_pivot":
            share = max(1, round(k / dup.shape[0]))
            for row_dup in dup:
                take = min(share, k - count)
                if take <= 0:
                    break
                cand = row_dup.masked_fill(taken, float("inf"))
                taken[torch.argsort(cand, stable=True)[:take]] = True
                count += take
        if count < k:
            worst = dup.max(dim=0).values.masked_fill(taken, float("inf"))
            taken[torch.argsort(worst, stable=True)[: k - count]] = True
        return RowPlan(taken.nonzero().flatten().to(row.features.device))
