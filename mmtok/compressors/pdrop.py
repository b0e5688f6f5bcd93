"""``pdrop``: PyramidDrop, staged drops of visual tokens at several depths of the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.fastv import check_layer, text_attn_of, top_by_score
from mmtok.core import RowPlan, TokenRow


def proportional_layers(
    fractions: tuple[float, ...], num_layers: int, name: str, low: int = 1, high: int | None = None
) -> list[int]:
    """Layer indices at the given fractions of the depth, rounded, clipped to ``[low, high]``.

    ``high`` defaults to the last layer, ``num_layers - 1``.

    Raises:
        ValueError: if the model is too shallow for that many distinct (strictly increasing) layers.
    """
    high = num_layers - 1 if high is None else high
    layers = [min(high, max(low, int(math.floor(f * num_layers + 0.5)))) for f in fractions]
    if high < low or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(
            f"{name}: a {num_layers}-layer model is too shallow for {len(fractions)} stages; "
            "pass layers=(...) explicitly"
        )
    return layers


def geometric_counts(n: int, k: int, stages: int, ratio: float | None) -> list[int]:
    """Tokens kept after each of ``stages`` drops: non-increasing, each in ``[k, n]``, the last exactly ``k``.

    With ``ratio=None`` every stage keeps the same fraction ``lambda = (k / n) ** (1 / stages)``; with a
    ratio, stage ``s`` keeps ``int(n * ratio ** s)`` (PyramidDrop's rule), never fewer than ``k``.
    """
    lam = (k / n) ** (1.0 / stages) if ratio is None else ratio
    counts = []
    for s in range(1, stages):
        value = int(math.floor(n * lam**s + 0.5)) if ratio is None else int(n * lam**s)
        counts.append(min(counts[-1] if counts else n, max(k, value)))
    return [*counts, k]


@register("pdrop")
@dataclass
class PyramidDrop(Compressor):
    """Rank visual tokens by the last instruction token's attention at several layers, dropping more each.

    Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction" (CVPR 2025), Section 3.2: the LLM is split into ``S + 1`` stages at layers
    ``l_1 < ... < l_S``; at the start of each stage the remaining image tokens are ranked by the
    attention the last instruction token pays them, computed with the stage's first layer's own
    (normalised, rotary-embedded) queries and keys (``signals["text_attn"]``), and only the top
    ``lambda`` share is carried into the stage. The paper's LLaVA-1.5 setting is ``l = 8, 16, 24`` of
    32 layers with ``lambda = 0.5`` (576 -> 288 -> 144 -> 72 tokens).

    Here the budget is the count after the last drop, exactly. By default the stage layers sit at
    1/4, 1/2 and 3/4 of the model's depth (8 / 16 / 24 on 32 layers) and every stage keeps the same
    share ``lambda = (budget / N) ** (1 / 3)``, which is the paper's 0.5 for a budget of N / 8; a
    given ``ratio`` uses the paper's ``int(N * lambda ** s)`` per stage instead, floored at the budget.
    Called directly (as a pure tensor method) one ranking keeps the budget's top tokens.

    Attributes:
        layers: the drop layers ``l_1 < ... < l_S`` (indices, >= 1), or None for 1/4, 1/2, 3/4 of the
            depth.
        ratio: ``lambda`` in (0, 1), or None to derive it from the budget.
    """

    paper = (
        "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy "
        "Reduction (Xing et al., CVPR 2025)"
    )
    stage = "llm"
    stages = ("llm",)
    modalities = ("image", "video", "audio")
    requires = frozenset({"text_attn"})

    layers: tuple[int, ...] | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, (tuple, list)) or not self.layers:
                raise ValueError(f"pdrop: layers must be a non-empty tuple of ints, got {self.layers!r}")
            self.layers = tuple(check_layer("pdrop: each of layers", x, 1) for x in self.layers)
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError(f"pdrop: layers must be strictly increasing, got {self.layers}")
        if self.ratio is not None:
            ok = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
            if not ok or not 0.0 < float(self.ratio) < 1.0:
                raise ValueError(f"pdrop: ratio (lambda) must be a float in (0, 1) or None, not {self.ratio!r}")

    def stage_layers(self, num_layers: int) -> list[int]:
        """The drop layers for a model of ``num_layers`` decoder layers."""
        if self.layers is None:
            return proportional_layers((0.25, 0.5, 0.75), num_layers, "pdrop")
        if self.layers[-1] >= num_layers:
            raise ValueError(
                f"pdrop: layers={self.layers} but the language model has {num_layers} layers "
                f"(indices 0..{num_layers - 1})"
            )
        return list(self.layers)

    def llm_schedule(self, num_visual: int, budget: int, num_layers: int) -> list[tuple[int, int, int]]:
        """``[(layer, layer, kept count), ...]`` per stage; the last count is ``budget``.

        Each stage ranks with the attention of the layer where it drops (the paper's rank-then-drop at
        the start of the stage).
        """
        layers = self.stage_layers(num_layers)
        counts = geometric_counts(num_visual, budget, len(layers), self.ratio)
        return [(layer, layer, c) for layer, c in zip(layers, counts, strict=True)]

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """One stage's ranking: the top ``k`` tokens by the last instruction token's attention."""
        return RowPlan(top_by_score(text_attn_of(row, "pdrop"), k))
