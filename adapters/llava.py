"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP / SigLIP tower, MLP projector, a Llama-style LM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtok.adapters.attention import capture, clip_attention_row
from mmtok.adapters.base import Adapter, Encoded


class LlavaAdapter(Adapter):
    """Adapter for ``model_type == "llava"`` (targets ``llava-hf/llava-1.5-7b-hf`` / ``-13b-hf``).

    Features come from ``model.model.get_image_features`` (the selected vision layer, CLS dropped under
    the ``"default"`` strategy, then the projector). At the ``vision`` stage a compressor sees the
    selected vision features before the projector, and the kept (or merged) tokens are then projected
    by the model's own projector. Positions are 1-D: kept tokens keep theirs, so the text after the
    image is numbered as in the uncompressed prompt.

    Signals: ``cls_attn`` is the CLS row (the mean over queries for towers without CLS) of the layer
    whose output the model selects (``vision_feature_layer``), as VisionZip and FasterVLM read it;
    ``mid_attn`` the same at the middle layer.
    """

    model_types = ("llava",)

    def placeholder(self, modality: str) -> str:
        """The processor's image token (``"<image>"``)."""
        return str(getattr(self.processor, "image_token", "<image>"))

    def token_id(self, modality: str) -> int:
        """``config.image_token_id``."""
        return int(self.config.image_token_id)

    def item_lengths(self, inputs: dict[str, Any], modality: str, count: int) -> list[int]:
        """Every image has the same number of tokens: the placeholders split evenly."""
        total = int((inputs["input_ids"] == self.token_id(modality)).sum())
        if count == 0 or total % count:
            raise ValueError(f"{total} image placeholder tokens cannot be split evenly over {count} images")
        return [total // count] * count

    def layers(self) -> list[nn.Module]:
        """The vision tower's encoder layers."""
        tower = self.model.model.vision_tower
        for path in ("vision_model.encoder.layers", "encoder.layers"):
            mod: Any = tower
            try:
                for part in path.split("."):
                    mod = getattr(mod, part)
            except AttributeError:
                continue
            return list(mod)
        raise ValueError(f"cannot find the encoder layers of vision tower {type(tower).__name__}")

    def signal_layers(self) -> dict[str, int]:
        """``cls_attn`` at the layer producing ``vision_feature_layer``'s output, ``mid_attn`` at the middle."""
        n = len(self.layers())
        vfl = self.config.vision_feature_layer
        vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
        # hidden_states[0] is the embedding output, so hidden_states[i] is the output of layer i - 1.
        layer = n + vfl if vfl < 0 else vfl - 1
        return {"cls_attn": max(layer, 0), "mid_attn": n // 2}

    def encode(self, inputs: dict[str, Any], modality: str, stage: str, signals: set[str]) -> Encoded:
        """Run the vision tower and projector once, capturing the projector's input and attention rows."""
        if modality != "image":
            raise ValueError(f"LLaVA-1.5 takes images only, got {modality}")
        base = self.model.model
        tower = base.vision_tower
        has_cls = any(hasattr(m, "class_embedding") for m in tower.modules())
        drop_first = has_cls and self.config.vision_feature_select_strategy == "default"
        layers = self.layers()
        where = self.signal_layers()
        hooks = {name: (layers[where[name]].self_attn, clip_attention_row(has_cls, drop_first)) for name in signals}
        if stage == "vision":
            hooks["_vision"] = (base.multi_modal_projector, _first_input)
        kwargs = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        with torch.no_grad(), capture(hooks) as found:
            out = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kwargs)
        feats = list(out.pooler_output)
        vision = None
        if "_vision" in found:
            v = found["_vision"][0]
            vision = list(v) if v.dim() == 3 else list(torch.split(v, [f.shape[0] for f in feats]))
        side = [round(f.shape[0] ** 0.5) for f in feats]
        grids: list[tuple[int, ...] | None] = [
            (s, s) if s * s == f.shape[0] else None for s, f in zip(side, feats, strict=True)
        ]
        sig = {name: list(found[name][0].to(feats[0].device)) for name in signals}
        return Encoded(feats, vision, base.multi_modal_projector, grids, sig)


def _first_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The projector's input (the selected vision features), as the pre-hook sees it."""
    return args[0] if args else next(iter(kwargs.values()))
