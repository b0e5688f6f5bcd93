"""The media tokens of a testbed model on the scenes' grids, for the dense supervision of training.

The dense losses (:mod:`mmtok.testbed.dense`) need, for every media token in the language model's input,
the part of the scene it covers. That holds when one LLM token covers exactly one layout cell: LLaVA's
projector keeps the vision tower's patch grid (``testbed-llava``: 336 px, 21 px patches, 16 x 16 tokens),
and Qwen2-VL's PatchMerger turns each 2 x 2 block of patches into one token, row-major over the merged grid
(``testbed-qwen2vl``: 448 px images, 14 px patches, 2 x 2 merge, 16 x 16 tokens; videos 8 temporal patches
x 12 x 12; Wang et al., 2024, Sec. 2.1: "an MLP layer ... compress adjacent 2 x 2 tokens into a single
token"). Qwen2-Audio's tokens are 40 ms steps of the clip (:mod:`mmtok.testbed.dense_audio`). This module
gets those tokens once per step in the very tensors the language model receives (so the probe's gradient
reaches the encoder) and says which sequence position holds which token of its media.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mmtok.testbed.curriculum import image_features, reduced_inputs
from mmtok.testbed.data.images import CELL, IMAGE_SIZE
from mmtok.testbed.data.videos import CELL as VIDEO_CELL
from mmtok.testbed.data.videos import VIDEO_SIZE

MEDIA = ("image", "video", "audio")


def model_kind(model: Any) -> str | None:
    """``"llava"``, ``"qwen2vl"`` or ``"qwen2audio"`` for the testbed architectures, else None."""
    inner = getattr(model, "model", None)
    if getattr(inner, "audio_tower", None) is not None:
        return "qwen2audio"
    if getattr(inner, "multi_modal_projector", None) is not None:
        return "llava"
    if getattr(inner, "visual", None) is not None and hasattr(inner.visual, "merger"):
        return "qwen2vl"
    return None


def tokens_per_side(size: Any) -> int:
    """LLM tokens per image side of a testbed :class:`~mmtok.testbed.models.Size`."""
    return size.image_size // (size.patch_size * size.merge_size)


def on_layout_grid(model: Any, size: Any) -> bool:
    """Whether each media token of ``model`` (built at ``size``) covers exactly one cell of the scenes.

    Images: ``IMAGE_SIZE / CELL`` tokens per side. Qwen2-VL videos too: ``VIDEO_SIZE / VIDEO_CELL`` tokens
    per side of each temporal patch (:mod:`mmtok.testbed.data.videos`). Audio tokens are always 40 ms steps.
    """
    kind = model_kind(model)
    if kind == "qwen2audio":
        return True
    pitch = size.patch_size * size.merge_size
    images = size.image_size % pitch == 0 and tokens_per_side(size) == IMAGE_SIZE // CELL
    if kind == "qwen2vl":
        return images and size.video_size % pitch == 0 and size.video_size // pitch == VIDEO_SIZE // VIDEO_CELL
    return kind is not None and images


@dataclass
class GridBatch:
    """One training batch's media tokens (see :func:`grid_inputs`).

    Attributes:
        tokens: per modality, ``[n_media, N, hidden]`` tokens exactly as the language model receives them
            (audio ones are filled in by the forward pass run under :meth:`capturing`).
        inputs: keyword arguments for ``model(**inputs)``.
        cells: ``[B, L]`` long, the index of each media position of the sequence within its media's tokens
            (``0..N-1``), -1 elsewhere.
        rows: per modality, ``[B]`` bool, the rows holding that media (filled in order).
        capture: the module whose output is the audio tokens (Qwen2-Audio's projector), hooked by
            :meth:`capturing`; None when :attr:`tokens` is complete already.
    """

    tokens: dict[str, torch.Tensor]
    inputs: dict[str, Any]
    cells: torch.Tensor
    rows: dict[str, torch.Tensor]
    capture: torch.nn.Module | None = field(default=None, repr=False)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Run the model's forward inside this: models that encode media inside it fill :attr:`tokens`."""
        if self.capture is None:
            yield
            return
        counts = (self.cells >= 0).sum(1)[self.rows["audio"]]

        def keep(_module: torch.nn.Module, _args: Any, out: torch.Tensor) -> None:
            if (counts > out.shape[1]).any():
                raise ValueError(f"{out.shape[1]} audio tokens per clip, but rows hold {counts.tolist()}")
            self.tokens["audio"] = out[:, :int(counts.max())]

        handle = self.capture.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def per_row(self, values: dict[str, torch.Tensor], fill: int = 0) -> torch.Tensor:
        """Per-media ``[n_media, N, ...]`` targets -> ``[B, max N, ...]`` on their batch rows, ``fill`` elsewhere.

        Raises:
            ValueError: the media's trailing target shapes differ.
        """
        trailing = {tuple(v.shape[2:]) for v in values.values()}
        if len(trailing) != 1:
            raise ValueError(f"every media needs the same target columns, got {sorted(trailing)}")
        first = next(iter(values.values()))
        width = max(v.shape[1] for v in values.values())
        out = first.new_full((self.cells.shape[0], width, *first.shape[2:]), fill)
        for media, v in values.items():
            out[self.rows[media], :v.shape[1]] = v
        return out


def _cells_of(ids: torch.Tensor, where: torch.Tensor, n: int, media: str) -> torch.Tensor:
    counts = where.sum(1)[where.any(1)]
    if (counts != n).any():
        raise ValueError(f"every {media} row must hold exactly {n} {media} placeholders, got {counts.tolist()}")
    return torch.arange(n, device=ids.device).repeat(len(counts))


def grid_inputs(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> GridBatch:
    """The media tokens, the model's inputs built from them, and each sequence position's media token.

    Args:
        model: a Llava, Qwen2-VL or Qwen2-Audio testbed model whose tokens lie on the scenes' grids.
        batch: a training batch of :func:`mmtok.testbed.models.encode_items` (``labels`` included);
            Qwen2-VL batches may mix image and video rows.
        keep: ``[n_images, N]`` bool, the image tokens to keep (the curriculum); None keeps all. Only
            Llava takes it (its positions are 1-D; Qwen2-VL's M-RoPE positions are not rebuilt here).

    Returns:
        A :class:`GridBatch`; run the forward pass under its :meth:`~GridBatch.capturing`.

    Raises:
        ValueError: an unsupported model, a ``keep`` mask for another model than Llava, or rows whose
            placeholder count differs from their media's token count.
    """
    kind = model_kind(model)
    if kind is None:
        raise ValueError(f"dense supervision needs a Llava, Qwen2-VL or Qwen2-Audio model, not {type(model).__name__}")
    if keep is not None and kind != "llava":
        raise ValueError("the background curriculum drops image tokens of Llava models only: use curriculum=0")
    ids = batch["input_ids"]
    cells = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    if kind == "qwen2audio":
        where = ids == model.config.audio_token_id
        per_clip = int(where.sum(1).max())
        cells[where] = _cells_of(ids, where, per_clip, "audio")
        return GridBatch({}, dict(batch), cells, {"audio": where.any(1)}, model.model.multi_modal_projector)
    image = ids == model.config.image_token_id
    if kind == "llava":
        feats = image_features(model, batch["pixel_values"])
        full = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        inputs = reduced_inputs(model, batch, feats, full if keep is None else keep)
        return GridBatch({"image": feats}, inputs, inputs.pop("visual_cells"), {"image": image.any(1)})
    # Qwen2-VL: the stock forward takes precomputed encoder outputs for all its media or for none.
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_values_videos")}
    inputs["mm_encoder_outputs"] = {}
    tokens, rows = {}, {}
    for media, pixels, grid, encode, token_id in (
            ("image", "pixel_values", "image_grid_thw", model.model.get_image_features, model.config.image_token_id),
            ("video", "pixel_values_videos", "video_grid_thw", model.model.get_video_features,
             model.config.video_token_id)):
        if batch.get(pixels) is None:
            continue
        encoded = encode(batch[pixels], batch[grid], return_dict=True)
        inputs["mm_encoder_outputs"][media] = encoded
        tokens[media] = torch.stack(list(encoded.pooler_output))
        where = ids == token_id
        cells[where] = _cells_of(ids, where, tokens[media].shape[1], media)
        rows[media] = where.any(1)
    return GridBatch(tokens, inputs, cells, rows)
