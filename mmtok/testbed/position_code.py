"""A fixed 2-D position code added to the learned position embeddings of a testbed CLIP vision tower.

Trained from scratch on the testbed's few hundred thousand items, CLIP's learned position embeddings stay
about as small as they start: in the shipped ``testbed-llava`` of session 4 their position-dependent part had
a norm of 0.75 per patch against 42 for the patch embeddings, so a visual token barely said where it was.
A linear read-out of "left / right half" from the tower's layer-0 states was right for 63 % of the tokens
(chance 50 %), the position and relation families stayed near chance, and a probe head trained to read the
half did not move off ``ln 2`` in 300 steps (Adam moves each entry by about the learning rate per step, so
reaching a useful size takes thousands of steps). Vision transformers trained on small data are commonly
given a fixed 2-D sine-cosine code instead (MoCo v3, Chen et al., ICCV 2021, Sec. 4.3 "Position embedding";
MAE, He et al., CVPR 2022, Appendix A.1): half the channels code the row, half the column, each as sines and
cosines of the index at geometrically spaced frequencies (the Transformer's code of Vaswani et al., 2017,
Sec. 3.5, per axis). We add such a code, scaled, to the learned table once when a run starts; it stays
trainable and the checkpoint is the stock architecture (the code is only in the weights).
"""

from __future__ import annotations

from typing import Any

import torch

TEMPERATURE = 10_000.0  # the Transformer's frequency base


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """The 2-D sine-cosine position code of a ``side x side`` patch grid.

    Args:
        side: patches per side.
        dim: channels; a multiple of 4 (row and column each get ``dim / 4`` sines and as many cosines).

    Returns:
        ``[side * side, dim]`` float, row-major over the grid (patch ``r * side + c``): channels
        ``[sin(r w), cos(r w), sin(c w), cos(c w)]`` for ``w = 10000 ** (-k / (dim / 4))``, ``k < dim / 4``.
        Every row has norm ``sqrt(dim / 2)``.

    Raises:
        ValueError: ``dim`` is not a positive multiple of 4 or ``side < 1``.
    """
    if dim < 4 or dim % 4:
        raise ValueError(f"the 2-D sine-cosine code needs a channel count that is a multiple of 4, got {dim}")
    if side < 1:
        raise ValueError(f"the grid side must be >= 1, got {side}")
    quarter = dim // 4
    omega = TEMPERATURE ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(side, dtype=torch.float64)
    rows = index[:, None].expand(side, side).reshape(-1, 1) * omega
    cols = index[None, :].expand(side, side).reshape(-1, 1) * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], 1).float()


@torch.no_grad()
def add_position_code(model: Any, amplitude: float) -> None:
    """Add ``amplitude * sincos_2d`` to the patch rows of a Llava model's CLIP position embeddings, in place.

    The class-token row is left as it is. An ``amplitude`` of 3 gives each patch's code a norm of about 21
    at 96 channels, half the typical norm of a testbed patch embedding: large enough to read, small enough
    that the content still dominates.

    Args:
        model: a ``LlavaForConditionalGeneration`` whose vision tower is CLIP (learned absolute positions).
        amplitude: scale of the code; must be > 0.

    Raises:
        ValueError: ``amplitude <= 0``, or a model without CLIP's position table (Qwen2-VL's vision tower
            codes positions with 2-D rotary embeddings and Whisper with fixed sinusoids: they need none).
    """
    if amplitude <= 0:
        raise ValueError(f"the position code amplitude must be > 0, got {amplitude}")
    embeddings = getattr(getattr(getattr(model, "model", None), "vision_tower", None), "embeddings", None)
    table = getattr(getattr(embeddings, "position_embedding", None), "weight", None)
    if table is None or not hasattr(embeddings, "class_embedding"):
        raise ValueError(f"{type(model).__name__} has no CLIP position table: the 2-D position code is for "
                         "Llava testbeds (Qwen2-VL and Whisper encoders code positions themselves)")
    patches = table.shape[0] - 1
    side = round(patches ** 0.5)
    if side * side != patches:
        raise ValueError(f"the position table has {patches} patch rows, not a square grid")
    table[1:] += amplitude * sincos_2d(side, table.shape[1]).to(table)
