"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes images and pooled videos.

Images follow LLaVA-NeXT's AnyRes packing (:mod:`mmtok.adapters.llava_next`: thumbnail + crops,
unpadding, one ``image_newline`` per row), with two OneVision differences the layouts follow by running
the model's own ``pack_image_features``: large crop grids are bilinearly shrunk to ``anyres_max_N`` crops'
worth of tokens (``vision_aspect_ratio``), and in a prompt with several images each image is one
unsplit view (``batch_num_images``) followed by one newline.

Videos: ``get_video_features`` runs the tower on every frame, projects, pools each frame's ``h x w``
grid to ``ceil(h/2) x ceil(w/2)`` (bilinear) and appends one ``image_newline`` token after the last
frame. A compressor sees the pooled tokens as a ``(T, H, W)`` grid, so ``Budget(per="frame")`` keeps the
same number in every frame; the trailing newline is never shown to it and always kept. Video tokens live
in the language model's input space at every stage (pooling follows the projector, so pre-projector
frame tokens have no one-to-one match in the LLM's sequence); attention signals are pooled by the
model's own ``apply_pooling`` exactly as the tokens are (bilinear; the mean of each 2x2 window when the
side is even).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmtok.adapters.anyres import AnyResEncoded, Layout
from mmtok.adapters.attention import capture, clip_attention_row
from mmtok.adapters.base import Encoded
from mmtok.adapters.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Adapter for ``model_type == "llava_onevision"`` (targets ``llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf``).

    Images: as :class:`~mmtok.adapters.llava_next.LlavaNextAdapter` (per-crop segments, GlobalCom2
    crop importance, newlines kept). Videos: see the module docstring. SigLIP towers have no CLS token,
    so ``cls_attn`` is the mean attention row of the selected layer (``vision_feature_layer``).
    """

    model_types = ("llava_onevision",)
    modalities = ("image", "video")

    def placeholder(self, modality: str) -> str:
        """The processor's ``<image>`` / ``<video>`` token."""
        if modality == "video":
            return str(getattr(self.processor, "video_token", "<video>"))
        return super().placeholder(modality)

    def token_id(self, modality: str) -> int:
        """``config.image_token_id`` or ``config.video_token_id``."""
        if modality == "video":
            return int(self.config.video_token_id)
        return super().token_id(modality)

    @property
    def _pooled(self) -> int:
        """Side of a frame's token grid after the model's 2x pooling."""
        return math.ceil(self._side / 2)

    def layouts(self, inputs: dict[str, Any], modality: str) -> list[Layout]:
        """Images as in LLaVA-NeXT; each video as ``T`` pooled frames then one newline."""
        if modality == "image":
            return self.image_layouts(inputs) if inputs.get("image_sizes") is not None else []
        if modality != "video":
            raise ValueError(f"{type(self).__name__} handles images and videos, got modality {modality!r}")
        pv = inputs.get("pixel_values_videos")
        if pv is None:
            return []
        videos, frames = int(pv.shape[0]), int(pv.shape[1])
        per_frame = self._pooled**2
        n = frames * per_frame
        lay = Layout(
            length=n + 1,
            order=torch.arange(n),
            newline=torch.tensor([n]),
            segments=[per_frame] * frames,
            crop_of=torch.arange(n) // per_frame,
            grid=(frames, self._pooled, self._pooled),
        )
        return [lay] * videos

    def encode(self, inputs: dict[str, Any], modality: str, stage: str, signals: set[str]) -> Encoded:
        """Images: as LLaVA-NeXT. Videos: ``get_video_features`` once, attention rows pooled like the tokens."""
        if modality != "video":
            return super().encode(inputs, modality, stage, signals)
        base = self.model.model
        has_cls, drop_first = self._has_cls()
        layers, where = self.layers(), self.signal_layers()
        row_fn = clip_attention_row(has_cls, drop_first)
        hooks = {name: (layers[where[name]].self_attn, row_fn) for name in signals}
        pv = inputs["pixel_values_videos"]
        with torch.no_grad(), capture(hooks) as found:
            out = base.get_video_features(pixel_values_videos=pv, return_dict=True)
        packed = list(out.pooler_output)
        lays = self.layouts(inputs, "video")
        videos, frames = int(pv.shape[0]), int(pv.shape[1])
        sig = {}
        for name in sorted(signals):
            rows = found[name][0].float()
            pooled = base.apply_pooling(rows.unsqueeze(-1)).reshape(videos, -1)
            sig[name] = [pooled[v].to(packed[0].device) for v in range(videos)]
        if packed[0].shape[0] != lays[0].length:
            raise ValueError(
                f"the model produced {packed[0].shape[0]} tokens per video, expected {frames} frames x "
                f"{self._pooled**2} + 1 newline"
            )
        feats = [p[lay.order.to(p.device)] for p, lay in zip(packed, lays, strict=True)]
        grids = [lay.grid for lay in lays]
        return AnyResEncoded(feats, None, None, grids, sig, None, layouts=lays, packed=packed)

    def pixels(self, modality: str, items: list[Any]) -> dict[str, Any]:
        """``pixel_values_videos`` ``[V, T, 3, H, W]`` for videos when the stock processor is unavailable.

        Uses the processor's video processor when it has one; otherwise does what
        ``LlavaOnevisionVideoProcessor`` does with ``do_sample_frames=False``, from its saved settings
        (``video_config``): every frame resized to ``size`` (bicubic), rescaled and normalised.
        """
        if modality != "video":
            return super().pixels(modality, items)
        vp = getattr(self.processor, "video_processor", None)
        if vp is not None:
            return {"pixel_values_videos": vp([v.frames for v in items], return_tensors="pt")["pixel_values_videos"]}
        cfg = dict(getattr(self.processor, "video_config", None) or {})
        side = int(self.config.vision_config.image_size)
        size = cfg.get("size") or {}
        height, width = int(size.get("height", side)), int(size.get("width", side))
        mean = torch.tensor(cfg.get("image_mean", CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("image_std", CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1)
        scale = float(cfg.get("rescale_factor", 1 / 255))
        frames = [resize_frames(v.frames, height, width) for v in items]
        if len({f.shape for f in frames}) != 1:
            raise ValueError("videos in one batch must have the same number of frames")
        return {"pixel_values_videos": (torch.stack(frames) * scale - mean) / std}

    def finish(self, kwargs: dict[str, Any], lengths: torch.Tensor) -> None:
        """Hand the video features over as one ``[1, N, D]`` tensor (the model flattens its first two dims)."""
        video = kwargs.get("mm_encoder_outputs", {}).get("video")
        if video is not None and isinstance(video.pooler_output, (list, tuple)):
            video.pooler_output = torch.cat(list(video.pooler_output), 0).unsqueeze(0)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_frames(frames: Any, height: int, width: int) -> torch.Tensor:
    """``[T, H0, W0, 3]`` uint8 frames -> ``[T, 3, height, width]`` float32 in [0, 255] (PIL bicubic)."""
    import numpy as np
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(np.asarray(f, dtype=np.uint8)).convert("RGB").resize((width, height), Image.BICUBIC))
        for f in frames
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
