"""``fastv``: drop the visual tokens the last prompt token attends to least, after layer K of the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow


def check_layer(name: str, value: object, low: int) -> int:
    """Validate an int layer index ``>= low`` (shared by the in-LLM methods)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def top_by_score(score: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` indices of the ``k`` largest scores, ties to the smallest index."""
    return torch.argsort(score.float(), descending=True, stable=True)[:k]


def text_attn_of(row: TokenRow, name: str) -> torch.Tensor:
    """The row's ``[n]`` ``text_attn`` signal, validated."""
    score = row.signals["text_attn"]
    if score.dim() != 1:
        raise ValueError(
            f"{name}: signals['text_attn'] must be [B, N] (one attention weight per token), "
            f"got a row of shape {tuple(score.shape)}"
        )
    return score


@register("fastv")
@dataclass
class FastV(Compressor):
    """Keep the ``k`` visual tokens that the last prompt token attends to most, after LLM layer ``K``.

    Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
    Large Vision-Language Models" (FastV, ECCV 2024), Section 4: the first ``K`` decoder layers see every
    token; at layer ``K`` (counted from 1, i.e. layer index ``K - 1``) the image tokens are re-ranked by
    the attention they receive, and the lowest-ranked ones are pruned from all later layers. Like the
    authors' code, the score of a visual token is the attention the last prompt token pays it at that
    layer, averaged over heads (``signals["text_attn"]``, ``[B, N]``, computed by the in-LLM stage from
    layer index ``K - 1``'s own queries and keys), and the kept count is the budget (the paper's
    ``R`` = 1 - budget / N). Here the budget fixes ``k`` exactly; ties go to the smaller index.

    As a pure tensor method it ranks whatever ``text_attn`` it is given; inside the LLM the adapter
    (:func:`mmtok.adapters.llm_stage.generate_with_llm_pruning`) follows :meth:`llm_schedule`.

    Attributes:
        layer: ``K``, the number of decoder layers that see every token (default 2, the paper's); the
            ranking uses the attention map of layer index ``K - 1`` and tokens leave at index ``K``.
    """

    paper = (
        "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large "
        "Vision-Language Models (FastV, Chen et al., ECCV 2024)"
    )
    stage = "llm"
    stages = ("llm",)
    modalities = ("image", "video", "audio")
    requires = frozenset({"text_attn"})

    layer: int = 2

    def __post_init__(self) -> None:
        check_layer("fastv: layer (K, the layers that see every token)", self.layer, 1)

    def llm_schedule(self, num_visual: int, budget: int, num_layers: int) -> list[tuple[int, int, int]]:
        """One stage: ``(attention layer, drop layer, kept count)`` = ``(K - 1, K, budget)``.

        Raises:
            ValueError: if the model has no layer ``K`` (``K >= num_layers``).
        """
        if self.layer >= num_layers:
            raise ValueError(
                f"fastv: layer={self.layer} but the language model has {num_layers} layers; "
                f"use 1 <= layer <= {num_layers - 1}"
            )
        return [(self.layer - 1, self.layer, budget)]

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Top-``k`` tokens by the last prompt token's attention."""
        return RowPlan(top_by_score(text_attn_of(row, "fastv"), k))
