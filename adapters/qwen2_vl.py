"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from mmtok.adapters.attention import capture, qwen_attention_row
from mmtok.adapters.base import Adapter, Encoded, left_padding
from mmtok.adapters.media import Video

# The stock Qwen2-VL video processor's defaults, used when the checkpoint ships no video config.
VIDEO_DEFAULTS = {
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 1 / 255,
}


class Qwen2VLAdapter(Adapter):
    """Adapter for ``model_type`` ``"qwen2_vl"`` and ``"qwen2_5_vl"``, images and videos.

    Targets ``Qwen/Qwen2-VL-2B-Instruct`` / ``-7B-Instruct`` and ``Qwen/Qwen2.5-VL-3B-Instruct`` / ``-7B-Instruct``.
    Features are the PatchMerger's output (one LLM token per 2x2 patches), so the ``vision`` and
    ``pre_llm`` stages see the same tokens. Positions are M-RoPE: ``get_rope_index`` numbers the unpruned
    sequence (with ``second_per_grid_ts`` for Qwen2.5-VL videos), the kept tokens keep their ``(t, h, w)``
    ids, the text after them keeps the stock numbering, and decoding continues from the last id;
    ``model.model.rope_deltas`` is set to ``max_pos + 1 - L_pruned`` as the stock model leaves it.

    Inputs are built from the processor's parts (tokenizer, image processor, video processor), exactly
    as ``Qwen2VLProcessor`` does (placeholders expanded to ``t*h*w/4`` tokens, ``mm_token_type_ids``),
    so a processor without a video processor (transformers' video processors need torchvision) still
    takes videos: frames are then resized with PIL under the video processor's ``smart_resize`` rule
    and cut into ``temporal x 14 x 14`` patches in the video processor's layout.

    Signals: ``cls_attn`` is the mean attention row (the tower has no CLS token) of the last
    full-attention vision block, summed over each 2x2 merge unit; ``mid_attn`` the same at the middle
    block (a windowed block in Qwen2.5-VL, where the mean is over the queries of each window).
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    modalities = ("image", "video")
    sequence_keys = ("input_ids", "attention_mask", "mm_token_type_ids")

    def _pad_token(self, modality: str) -> str:
        default = "<|image_pad|>" if modality == "image" else "<|video_pad|>"
        tok = getattr(self.processor, f"{modality}_token", None) or getattr(self.tokenizer, f"{modality}_token", None)
        return str(tok or default)

    def placeholder(self, modality: str) -> str:
        """``"<|vision_start|><|image_pad|><|vision_end|>"`` (``<|video_pad|>`` for videos)."""
        return f"<|vision_start|>{self._pad_token(modality)}<|vision_end|>"

    def token_id(self, modality: str) -> int:
        """``config.image_token_id`` / ``config.video_token_id``."""
        return int(self.config.image_token_id if modality == "image" else self.config.video_token_id)

    @property
    def _merge(self) -> int:
        return int(self.model.model.visual.spatial_merge_size)

    def item_lengths(self, inputs: dict[str, Any], modality: str, count: int) -> list[int]:
        """``t * h * w / merge**2`` per item, from ``image_grid_thw`` / ``video_grid_thw``."""
        grid = inputs[f"{modality}_grid_thw"]
        if grid.shape[0] != count:
            raise ValueError(f"the processor returned {grid.shape[0]} {modality} grids for {count} items")
        return (grid.prod(-1) // self._merge**2).tolist()

    # ------------------------------------------------------------------ inputs

    def process(self, prompts: list[str], media: dict[str, list[Any]]) -> dict[str, Any]:
        """Image / video processor, placeholder expansion, tokenizer (left padding), ``mm_token_type_ids``."""
        out: dict[str, Any] = {}
        counts: dict[str, list[int]] = {}
        if media.get("image"):
            px = self.processor.image_processor(images=media["image"], return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = px["pixel_values"], px["image_grid_thw"]
            counts["image"] = (out["image_grid_thw"].prod(-1) // self._merge**2).tolist()
        if media.get("video"):
            out.update(self._videos(media["video"]))
            counts["video"] = (out["video_grid_thw"].prod(-1) // self._merge**2).tolist()
        texts = list(prompts)
        for m, ns in counts.items():
            texts = _expand(texts, self._pad_token(m), ns)
        with left_padding(self.tokenizer):
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        out["input_ids"], out["attention_mask"] = ids, enc["attention_mask"]
        types = torch.zeros_like(ids)
        types[ids == self.token_id("image")] = 1
        types[ids == self.token_id("video")] = 2
        out["mm_token_type_ids"] = types
        return self.to_device(out)

    def _videos(self, videos: list[Video]) -> dict[str, Any]:
        vp = getattr(self.processor, "video_processor", None)
        if vp is not None:
            px = vp(videos=[v.frames for v in videos], do_sample_frames=False, return_tensors="pt")
            out = {"pixel_values_videos": px["pixel_values_videos"], "video_grid_thw": px["video_grid_thw"]}
            temporal = int(vp.temporal_patch_size)
        else:
            cfg = {**VIDEO_DEFAULTS, **(getattr(self.processor, "video_config", None) or {})}
            patches, grids = zip(*(video_patches(v.frames, cfg) for v in videos), strict=True)
            out = {
                "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            }
            temporal = int(cfg["temporal_patch_size"])
        if "second_per_grid_ts" in inspect.signature(self.model.model.get_rope_index).parameters:
            out["second_per_grid_ts"] = torch.tensor([temporal / v.fps for v in videos], dtype=torch.float32)
        return out

    # ------------------------------------------------------------------ encoder and signals

    def signal_layers(self) -> dict[str, int]:
        """The last full-attention block for ``cls_attn``, the middle block for ``mid_attn``."""
        visual = self.model.model.visual
        depth = len(visual.blocks)
        full = list(getattr(visual, "fullatt_block_indexes", None) or range(depth))
        return {"cls_attn": int(full[-1]), "mid_attn": depth // 2}

    def encode(self, inputs: dict[str, Any], modality: str, stage: str, signals: set[str]) -> Encoded:
        """Run the vision tower once on the images (or videos), capturing the chosen blocks' attention rows."""
        base = self.model.model
        visual = base.visual
        grid = inputs[f"{modality}_grid_thw"]
        where = self.signal_layers()
        hooks = {name: (visual.blocks[where[name]].attn, qwen_attention_row) for name in signals}
        with torch.no_grad(), capture(hooks) as found:
            if modality == "image":
                out = base.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=grid, return_dict=True)
            else:
                out = base.get_video_features(
                    pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=grid, return_dict=True
                )
        feats = list(out.pooler_output)
        lengths = [f.shape[0] for f in feats]
        unit = self._merge**2
        sig = {}
        for name in signals:
            score = found[name][0].view(-1, unit).sum(1)
            if hasattr(visual, "window_size"):
                # Qwen2.5-VL runs its blocks on merge units in window order; undo it as the model does.
                from transformers.vision_utils import get_vision_window_index

                index, _ = get_vision_window_index(grid, self._merge, visual.window_size, visual.patch_size)
                score = score[torch.argsort(index.to(score.device))]
            sig[name] = list(torch.split(score.to(feats[0].device), lengths))
        m = self._merge
        grids: list[tuple[int, ...] | None] = [
            (h // m, w // m) if t == 1 else (t, h // m, w // m) for t, h, w in grid.tolist()
        ]
        return Encoded(feats, None, None, grids, sig)

    # ------------------------------------------------------------------ positions

    def positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[4, B, L]``: the text positions, then the stock ``get_rope_index`` ``(t, h, w)`` ids."""
        text = super().positions(inputs)
        base = self.model.model
        accepted = set(inspect.signature(base.get_rope_index).parameters)
        kw = {
            k: inputs[k]
            for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if k in accepted and inputs.get(k) is not None
        }
        rope, _ = base.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"], **kw
        )
        return torch.cat([text.unsqueeze(0).to(rope.dtype), rope], 0)

    def finish(self, kwargs: dict[str, Any], lengths: torch.Tensor) -> None:
        """Renumber the text row to the shorter sequence; set ``rope_deltas = max_pos + 1 - L_pruned``.

        Row 0 of the 4-row ids is the text (cache) position, which masks are built from; it counts the
        tokens actually present. Rows 1-3 are the M-RoPE ids the kept tokens keep.
        """
        pos = kwargs["position_ids"]
        mask = kwargs["attention_mask"]
        pos[0] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(pos.dtype)
        deltas = pos[1:].amax(dim=(0, 2)) + 1 - lengths.to(pos.device)
        self.model.model.rope_deltas = deltas.unsqueeze(1)


def _expand(texts: list[str], token: str, counts: list[int]) -> list[str]:
    """Replace the ``j``-th ``token`` over all texts (in order) by ``counts[j]`` copies of it."""
    it = iter(counts)
    out = []
    for t in texts:
        parts = t.split(token)
        out.append(parts[0] + "".join(token * next(it) + p for p in parts[1:]))
    return out


def video_patches(frames: np.ndarray, cfg: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    """Frames ``[T, H, W, 3]`` uint8 -> ``pixel_values_videos`` ``[t*h*w, 3*tp*p*p]`` and ``[t, h, w]``.

    The Qwen2-VL video processor's steps, on numpy / PIL: ``smart_resize`` to multiples of
    ``patch * merge`` within the size limits, bicubic resize, rescale and normalise, repeat the last
    frame up to a multiple of the temporal patch, and lay the patches out merge-unit by merge-unit.
    """
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    p, tp, m = int(cfg["patch_size"]), int(cfg["temporal_patch_size"]), int(cfg["merge_size"])
    size = cfg["size"]
    h0, w0 = frames.shape[1:3]
    h, w = smart_resize(h0, w0, factor=p * m, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    x = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])
    if pad := -x.shape[0] % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    t, gh, gw = x.shape[0] // tp, h // p, w // p
    # Lay the patches out while the pixels are bytes (a quarter of the float copy), then scale them in one
    # pass: each value goes through the same float32 steps as on the frames, so the result is identical.
    x = x.reshape(t, tp, gh // m, m, p, gw // m, m, p, 3).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    x = np.ascontiguousarray(x).reshape(t * gh * gw, 3, tp * p * p).astype(np.float32)
    x *= float(cfg["rescale_factor"])
    x -= np.asarray(cfg["image_mean"], np.float32)[:, None]
    x /= np.asarray(cfg["image_std"], np.float32)[:, None]
    return x.reshape(t * gh * gw, 3 * tp * p * p), [t, gh, gw]
