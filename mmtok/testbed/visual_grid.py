"""The visual tokens of a testbed model on the scenes' layout grid, for the dense supervision of training.

The dense losses (:mod:`mmtok.testbed.dense`) need, for every visual token in the language model's input,
the layout cell of the scene it covers. That holds when one LLM token covers exactly one cell: LLaVA's
projector keeps the vision tower's patch grid (``testbed-llava``: 336 px, 21 px patches, 16 x 16 tokens),
and Qwen2-VL's PatchMerger turns each 2 x 2 block of patches into one token, row-major over the merged grid
(``testbed-qwen2vl``: 448 px, 14 px patches, 2 x 2 merge, 16 x 16 tokens; Wang et al., 2024, Sec. 2.1
"Naive Dynamic Resolution": "an MLP layer ... compress adjacent 2 x 2 tokens into a single token"). This
module computes those tokens once per step, feeds the same tensor to the language model (so the probe's
gradient reaches the vision tower) and says which sequence position holds which cell.
"""

from __future__ import annotations

from typing import Any

import torch

from mmtok.testbed.curriculum import image_features, reduced_inputs
from mmtok.testbed.data.images import CELL, IMAGE_SIZE


def model_kind(model: Any) -> str | None:
    """``"llava"`` or ``"qwen2vl"`` for the testbed architectures with image tokens on a patch grid, else None."""
    inner = getattr(model, "model", None)
    if getattr(inner, "multi_modal_projector", None) is not None:
        return "llava"
    if getattr(inner, "visual", None) is not None and hasattr(inner.visual, "merger"):
        return "qwen2vl"
    return None


def tokens_per_side(size: Any) -> int:
    """LLM tokens per image side of a testbed :class:`~mmtok.testbed.models.Size`."""
    return size.image_size // (size.patch_size * size.merge_size)


def on_layout_grid(model: Any, size: Any) -> bool:
    """Whether each image token of ``model`` (built at ``size``) covers exactly one layout cell of the scenes."""
    exact = size.image_size % (size.patch_size * size.merge_size) == 0
    return model_kind(model) is not None and exact and tokens_per_side(size) == IMAGE_SIZE // CELL


def grid_inputs(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
    """The image tokens, the model's inputs built from them, and the cell of each sequence position.

    Args:
        model: a Llava or Qwen2-VL testbed model whose image tokens lie on the layout grid.
        batch: a training batch of :func:`mmtok.testbed.models.encode_items` (``labels`` included);
            Qwen2-VL batches may mix image and video rows.
        keep: ``[n_images, N]`` bool, the image tokens to keep (the curriculum); None keeps all. Only
            Llava takes it (its positions are 1-D; Qwen2-VL's M-RoPE positions are not rebuilt here).

    Returns:
        ``(features, inputs, visual_cells, image_rows)``: the ``[n_images, N, hidden]`` image tokens;
        keyword arguments for ``model(**inputs)``; ``[B, L]`` long, the layout cell of each image token in
        the sequence the model sees and -1 elsewhere; ``[B]`` bool, the rows holding an image (in order).

    Raises:
        ValueError: an unsupported model, a ``keep`` mask for Qwen2-VL, or rows whose placeholder count is
            not ``N``.
    """
    kind = model_kind(model)
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    image_rows = image.any(1)
    if kind == "llava":
        feats = image_features(model, batch["pixel_values"])
        full = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        inputs = reduced_inputs(model, batch, feats, full if keep is None else keep)
        cells = inputs.pop("visual_cells")
        return feats, inputs, cells, image_rows
    if kind != "qwen2vl":
        raise ValueError(f"dense supervision needs a Llava or Qwen2-VL testbed model, not {type(model).__name__}")
    if keep is not None:
        raise ValueError("the background curriculum drops tokens of Llava models only; use curriculum=0 for Qwen2-VL")
    encoded = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    feats = torch.stack(list(encoded.pooler_output))
    n = feats.shape[1]
    counts = image.sum(1)[image_rows]
    if (counts != n).any():
        raise ValueError(f"every image row must hold exactly {n} image placeholders, got {counts.tolist()}")
    cells = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    cells[image] = torch.arange(n, device=ids.device).repeat(int(image_rows.sum()))
    # The stock forward takes precomputed encoder outputs for all media or for none.
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_values_videos")}
    inputs["mm_encoder_outputs"] = {"image": encoded}
    if batch.get("pixel_values_videos") is not None:
        inputs["mm_encoder_outputs"]["video"] = model.model.get_video_features(
            batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
    return feats, inputs, cells, image_rows


def per_row(values: torch.Tensor, image_rows: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """``[n_images, ...]`` -> ``[B, ...]``: each image's values on its batch row, ``fill`` on the other rows."""
    out = values.new_full((image_rows.shape[0], *values.shape[1:]), fill)
    out[image_rows] = values
    return out
