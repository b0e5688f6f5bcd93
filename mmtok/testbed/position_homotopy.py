"""Move a transferred language model from 1-D positions to Qwen2-VL's M-RoPE positions during training.

``testbed-qwen2vl`` starts its language model from ``testbed-llava`` (:mod:`mmtok.testbed.transfer`), which
learned to read its 256 image tokens at 1-D positions ``p .. p + 255`` with the answer after them. Qwen2-VL's
M-RoPE (Wang et al., 2024, Sec. 2.1) gives those tokens ``(t, h, w) = (p, p + row, p + col)`` and the text
after them ``p + 16``: the rotary phases of every image token and the answer's distance to the question all
change. Fed Llava's own visual tokens, the copied model answers 80 % of held-out image items with 1-D
position ids and 31 % with M-RoPE ones (issue #4, session 6), so it has to relearn how to read, which the
answer loss alone did not do in 1,700 steps.

The homotopy trains at position ids ``(1 - a) * p_1d + a * p_mrope`` (rotary embeddings take real
positions), with ``a`` rising linearly from 0 to 1 over the first ``share`` of the steps: the model starts
where it reads well and tracks its positions as they move, the idea of position interpolation (Chen et al.,
2023, "Extending Context Window of Large Language Models via Positional Interpolation", Sec. 2.3), used
here along a path between two position schemes rather than to a longer context. From ``a = 1`` on (and at
inference) the positions are exactly the stock model's.
"""

from __future__ import annotations

from typing import Any

import torch


def homotopy_weight(step: int, steps: int, share: float) -> float:
    """``a`` at 0-based ``step``: ``step / (share * steps)``, capped at 1; 1 throughout when ``share`` is 0.

    Raises:
        ValueError: ``share`` outside ``[0, 1]``.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the homotopy share of the steps must be in [0, 1], got {share}")
    if share == 0.0:
        return 1.0
    return min(1.0, step / (share * steps))


def blended_position_ids(model: Any, inputs: dict[str, Any], weight: float) -> torch.Tensor:
    """``[3, B, L]`` float position ids between 1-D (``weight`` 0) and the stock M-RoPE ones (``weight`` 1).

    Args:
        model: a ``Qwen2VLForConditionalGeneration``.
        inputs: the forward's inputs: ``input_ids``, ``mm_token_type_ids`` and ``attention_mask`` ``[B, L]``
            (right padding), and the ``image_grid_thw`` / ``video_grid_thw`` of the media they hold.
        weight: ``a`` in ``[0, 1]``.

    Raises:
        ValueError: ``weight`` outside ``[0, 1]``.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the homotopy weight must be in [0, 1], got {weight}")
    mask = inputs["attention_mask"]
    mrope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                          inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), mask)
    flat = (mask.long().cumsum(-1) - 1).clamp_min(0)[None].expand_as(mrope)
    return (1.0 - weight) * flat.float() + weight * mrope.float()
