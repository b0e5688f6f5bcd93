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

from dataclasses import dataclass
from typing import Any

import torch

from mmtok.testbed.curriculum import image_features, reduced_inputs
from mmtok.testbed.data.images import CELL, IMAGE_SIZE
from mmtok.testbed.data.videos import CELL as VIDEO_CELL
from mmtok.testbed.data.videos import VIDEO_SIZE


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
    """Whether each media token of ``model`` (built at ``size``) covers exactly one layout cell of the scenes.

    Images: ``IMAGE_SIZE / CELL`` tokens per side. Qwen2-VL videos too: ``VIDEO_SIZE / VIDEO_CELL`` tokens
    per side of each temporal patch (:mod:`mmtok.testbed.data.videos`).
    """
    pitch = size.patch_size * size.merge_size
    kind = model_kind(model)
    images = size.image_size % pitch == 0 and tokens_per_side(size) == IMAGE_SIZE // CELL
    if kind == "qwen2vl":
        return images and size.video_size % pitch == 0 and size.video_size // pitch == VIDEO_SIZE // VIDEO_CELL
    return kind is not None and images


@dataclass
class GridBatch:
    """One training batch's media tokens on the layout grid (see :func:`grid_inputs`).

    Attributes:
        image_tokens: ``[n_images, N, hidden]`` image tokens, as the language model receives them.
        video_tokens: ``[n_videos, M, hidden]`` video tokens (Qwen2-VL batches with videos), else None.
        inputs: keyword arguments for ``model(**inputs)`` built from those tokens.
        cells: ``[B, L]`` long, the token index within its image (``0..N-1``) or video (``0..M-1``) of each
            media position of the sequence the model sees, -1 elsewhere.
        image_rows: ``[B]`` bool, the rows holding an image (images fill them in order).
        video_rows: ``[B]`` bool, the rows holding a video.
    """

    image_tokens: torch.Tensor
    video_tokens: torch.Tensor | None
    inputs: dict[str, Any]
    cells: torch.Tensor
    image_rows: torch.Tensor
    video_rows: torch.Tensor

    def per_row(self, image_values: torch.Tensor, video_values: torch.Tensor | None = None, fill: int = 0
                ) -> torch.Tensor:
        """Per-media ``[n, N(, ...)]`` targets -> ``[B, max(N, M)(, ...)]`` on their batch rows, ``fill`` elsewhere."""
        width = max(image_values.shape[1], 0 if video_values is None else video_values.shape[1])
        out = image_values.new_full((self.image_rows.shape[0], width, *image_values.shape[2:]), fill)
        out[self.image_rows, :image_values.shape[1]] = image_values
        if video_values is not None:
            out[self.video_rows, :video_values.shape[1]] = video_values
        return out


def grid_inputs(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> GridBatch:
    """The media tokens, the model's inputs built from them, and the grid token at each sequence position.

    Args:
        model: a Llava or Qwen2-VL testbed model whose image tokens lie on the layout grid.
        batch: a training batch of :func:`mmtok.testbed.models.encode_items` (``labels`` included);
            Qwen2-VL batches may mix image and video rows.
        keep: ``[n_images, N]`` bool, the image tokens to keep (the curriculum); None keeps all. Only
            Llava takes it (its positions are 1-D; Qwen2-VL's M-RoPE positions are not rebuilt here).

    Returns:
        A :class:`GridBatch`.

    Raises:
        ValueError: an unsupported model, a ``keep`` mask for Qwen2-VL, or rows whose placeholder count
            differs from their media's token count.
    """
    kind = model_kind(model)
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    no_video = torch.zeros_like(image[:, 0])
    if kind == "llava":
        feats = image_features(model, batch["pixel_values"])
        full = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        inputs = reduced_inputs(model, batch, feats, full if keep is None else keep)
        cells = inputs.pop("visual_cells")
        return GridBatch(feats, None, inputs, cells, image.any(1), no_video)
    if kind != "qwen2vl":
        raise ValueError(f"dense supervision needs a Llava or Qwen2-VL testbed model, not {type(model).__name__}")
    if keep is not None:
        raise ValueError("the background curriculum drops tokens of Llava models only; use curriculum=0 for Qwen2-VL")
    cells = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    # The stock forward takes precomputed encoder outputs for all media or for none.
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_values_videos")}
    inputs["mm_encoder_outputs"] = {}
    tokens = {}
    for media, pixels, grid, token_id in (("image", "pixel_values", "image_grid_thw", model.config.image_token_id),
                                          ("video", "pixel_values_videos", "video_grid_thw",
                                           model.config.video_token_id)):
        if batch.get(pixels) is None:
            continue
        encode = model.model.get_image_features if media == "image" else model.model.get_video_features
        encoded = encode(batch[pixels], batch[grid], return_dict=True)
        inputs["mm_encoder_outputs"][media] = encoded
        feats = torch.stack(list(encoded.pooler_output))
        where = ids == token_id
        counts = where.sum(1)[where.any(1)]
        if (counts != feats.shape[1]).any():
            raise ValueError(f"every {media} row must hold exactly {feats.shape[1]} {media} placeholders, "
                             f"got {counts.tolist()}")
        cells[where] = torch.arange(feats.shape[1], device=ids.device).repeat(feats.shape[0])
        tokens[media] = feats
    if "image" not in tokens:
        raise ValueError("a dense training batch needs at least one image")
    video = ids == model.config.video_token_id
    return GridBatch(tokens["image"], tokens.get("video"), inputs, cells, image.any(1), video.any(1))
