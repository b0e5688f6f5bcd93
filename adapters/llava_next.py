"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes thumbnail and high-resolution crops.

The model encodes every image as a thumbnail (the whole image at the tower's resolution) plus a grid of
high-resolution crops, projects each crop's tokens, then ``pack_image_features`` joins the crops into one
large grid, cuts the padding rows / columns (``unpad_image``), appends one ``image_newline`` token after
each row of that grid and puts the thumbnail's tokens in front. The language model sees that packed
sequence: ``[thumbnail (h*w)] [row 0 ... newline] [row 1 ... newline] ...``.

What a compressor sees here: the image's feature tokens in *crop order* (the thumbnail, then each crop in
row-major crop order, each crop's tokens row-major as they stand after unpadding), with one segment per
crop, so ``Budget(per="crop")`` gives every crop (and the thumbnail) its own budget. The ``image_newline``
tokens are never shown to a compressor and are always kept, in place: they are a learned constant that
marks the 2-D layout, carry no image content, and the model was trained with one after every row. This is
the choice GlobalCom2 makes as well (it compresses the crop features and keeps every newline token). A
budget therefore counts feature tokens; the LLM sees ``kept + rows`` tokens for a multi-crop image.

Global guidance (GlobalCom2: Liu et al., "Compression with Global Guidance: Towards Training-free
High-Resolution MLLMs Acceleration", arXiv 2501.05179, 2025, later titled "Global Compression Commander";
its crop-wise retention ratios, the "thumbnail as commander" allocation): every image with crops
gets ``signals["importance"]``, constant within a segment, that makes ``Budget(..., per="crop",
allocation="adaptive")`` share the image's budget as the paper does. The thumbnail's CLS attention
(mean attention for towers without CLS) at the ``cls_attn`` layer is summed over the thumbnail region
that each crop covers, ``s_j``; then ``sigma = softmax((s - max s) / tau)`` over the ``n`` crops and crop
``j`` gets the weight ``1 + sigma_j - 1/n`` while the thumbnail gets 1. As adaptive allocation gives each
segment a share proportional to its weight, crop ``j`` keeps ``R * (1 + sigma_j - 1/n)`` of its tokens
and the thumbnail ``R`` (exactly so when the segments are the same length), the paper's retention
ratios. ``tau`` is :attr:`LlavaNextAdapter.crop_temperature` (10, the authors' default).

The mapping between crop order and the packed sequence comes from the model's own
``pack_image_features`` run on a small tensor of token coordinates (and signals), so unpadding and any
interpolation the model does are followed exactly, without re-implementing them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from mmtok.adapters.anyres import FLAG, AnyResEncoded, Layout, expand_placeholders, read_layout
from mmtok.adapters.attention import capture, clip_attention_row
from mmtok.adapters.base import Encoded, Request, Spliced, left_padding
from mmtok.adapters.llava import LlavaAdapter
from mmtok.core import RowPlan, TokenPlan, VisualTokens, as_budget, segment_counts
from mmtok.core.budget import BudgetLike


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for ``model_type == "llava_next"`` (see the module docstring for the token layout).

    Targets ``llava-hf/llava-v1.6-mistral-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf`` / ``-13b-hf`` and
    ``llava-hf/llava-v1.6-34b-hf`` (CLIP ViT-L/14-336 with CLS, ``"default"`` feature selection).

    Class variables:
        crop_temperature: GlobalCom2's softmax temperature ``tau`` over the crops' thumbnail attention;
            lower values move more of an adaptive budget to the crops the thumbnail attends to.

    Stages: at ``vision`` a compressor sees the selected vision features before the projector (the kept
    tokens are then projected by the model's projector); at ``pre_llm`` the projected features. Where the
    model interpolates the packed grid (LLaVA-OneVision's ``anyres_max_N`` on large images) the packed
    tokens have no pre-projector counterpart, and the ``vision`` stage sees the projected features.
    """

    model_types = ("llava_next",)
    crop_temperature: float = 10.0

    # ------------------------------------------------------------------ layouts

    def _module(self) -> Any:
        return importlib.import_module(type(self.model.model).__module__)

    @property
    def _side(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def _patch_counts(self, inputs: dict[str, Any]) -> list[int]:
        """Crops per image (thumbnail included), as the model's ``get_image_features`` counts them."""
        mod = self._module()
        vc = self.config.vision_config
        sizes = inputs["image_sizes"]
        counts = [
            int(mod.image_size_to_num_patches(s, self.config.image_grid_pinpoints, vc.image_size)) for s in sizes
        ]
        per_prompt = inputs.get("batch_num_images")
        if per_prompt is not None:
            single = [int(n) == 1 for n in per_prompt for _ in range(int(n))]
            counts = [c if s else 1 for c, s in zip(counts, single, strict=True)]
        return counts

    def _pack(self, inputs: dict[str, Any], items: list[torch.Tensor], newline: torch.Tensor) -> list[torch.Tensor]:
        base = self.model.model
        params = inspect.signature(base.pack_image_features).parameters
        kw: dict[str, Any] = {"image_newline": newline}
        if "vision_feature_select_strategy" in params:
            kw["vision_feature_select_strategy"] = self.config.vision_feature_select_strategy
        if "vision_aspect_ratio" in params:
            kw["vision_aspect_ratio"] = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = base.pack_image_features(items, inputs["image_sizes"].cpu(), **kw)
        return list(packed)

    def image_layouts(self, inputs: dict[str, Any], extra: list[torch.Tensor] | None = None) -> list[Layout]:
        """Each image's :class:`Layout`, from the processor's outputs (no encoder runs).

        Args:
            inputs: the processor's outputs (``image_sizes``, and ``batch_num_images`` for OneVision).
            extra: per image, ``[patches, h*w, c]`` per-token values (signals) to carry into the layouts'
                ``channels``, packed exactly as the model packs its features.
        """
        side = self._side
        mod = self._module()
        vc = self.config.vision_config
        counts = self._patch_counts(inputs)
        sizes = inputs["image_sizes"].cpu()
        y = torch.arange(side, dtype=torch.float64).repeat_interleave(side)
        x = torch.arange(side, dtype=torch.float64).repeat(side)
        items, grids = [], []
        for j, p in enumerate(counts):
            ys, xs = [y], [x]
            shape = None
            if p > 1:
                grid = mod.get_anyres_image_grid_shape(sizes[j], self.config.image_grid_pinpoints, vc.image_size)
                rows, cols = int(grid[0]), int(grid[1])
                shape = (rows, cols)
                for k in range(p - 1):
                    ys.append(y + (k // cols) * side)
                    xs.append(x + (k % cols) * side)
            coords = torch.stack([torch.ones(p, side * side, dtype=torch.float64), torch.stack(ys), torch.stack(xs)], -1)
            if extra is not None:
                coords = torch.cat([coords, extra[j].detach().to("cpu", torch.float64)], -1)
            items.append(coords)
            grids.append(shape)
        newline = torch.zeros(items[0].shape[-1], dtype=torch.float64) if items else torch.zeros(3)
        newline[FLAG] = -1.0
        packed = self._pack(inputs, items, newline) if items else []
        return [read_layout(z, side, g) for z, g in zip(packed, grids, strict=True)]

    def layouts(self, inputs: dict[str, Any], modality: str) -> list[Layout]:
        """The :class:`Layout` of every item of ``modality`` in a processed batch."""
        if modality != "image":
            raise ValueError(f"{type(self).__name__} handles images only, got modality {modality!r}")
        return self.image_layouts(inputs) if inputs.get("image_sizes") is not None else []

    # ------------------------------------------------------------------ adapter hooks

    def process(self, prompts: list[str], media: dict[str, list[Any]]) -> dict[str, Any]:
        """Run the stock processor, or its parts where the stock class cannot be built.

        ``mmtok.api.ProcessorParts`` stands in where the stock processor class needs torchvision: then
        the image processor runs, each placeholder is repeated as often as the model's own packing
        implies (see :meth:`layouts`), and the tokenizer pads on the left.
        """
        from transformers import ProcessorMixin

        if isinstance(self.processor, ProcessorMixin):
            return super().process(prompts, media)
        out: dict[str, Any] = {}
        texts = list(prompts)
        if media.get("image"):
            px = self.processor.image_processor(images=media["image"], return_tensors="pt")
            out.update({k: px[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in px})
        for modality in self.modalities:
            if media.get(modality):
                if modality != "image":
                    out.update(self.pixels(modality, media[modality]))
                counts = [lay.length for lay in self.layouts(out, modality)]
                texts = expand_placeholders(texts, self.placeholder(modality), counts)
        with left_padding(self.tokenizer):
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return self.to_device(out)

    def pixels(self, modality: str, items: list[Any]) -> dict[str, Any]:
        """Pixel tensors for a modality the image processor does not handle (none for LLaVA-NeXT)."""
        raise ValueError(f"{type(self).__name__} takes no {modality} items")

    def item_lengths(self, inputs: dict[str, Any], modality: str, count: int) -> list[int]:
        """Placeholders per item: feature tokens after unpadding plus newline tokens."""
        lengths = [lay.length for lay in self.layouts(inputs, modality)]
        if len(lengths) != count:
            raise ValueError(f"the processor returned {len(lengths)} {modality} item(s) for {count} given")
        return lengths

    def protected_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, L]`` bool: the placeholder columns that hold ``image_newline`` tokens.

        Stages that choose among the placeholders themselves (the ``llm`` stage) leave these out of the
        droppable visual tokens, as the ``vision`` / ``pre_llm`` stages do.
        """
        out = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        for modality in self.modalities:
            lays = self.layouts(inputs, modality)
            if lays:
                spans = self.spans(inputs, modality, [lay.length for lay in lays])
                for (row, cols), lay in zip(spans, lays, strict=True):
                    out[row, cols[lay.newline.to(cols.device)]] = True
        return out

    def check_budget(self, request: Request, budgets: list[BudgetLike], modality: str = "image") -> None:
        """Check each item's budget against the tokens (and crops / frames) its compressor will see.

        Raises:
            ValueError: an int budget exceeds an item's (or a crop's / frame's) tokens, or an adaptive
                budget is below its per-segment minimum.
        """
        for j, (row, lay) in enumerate(zip(request.item_rows[modality], self.layouts(request.inputs, modality), strict=True)):
            bud = as_budget(budgets[row])
            stub = VisualTokens(
                torch.zeros(1, lay.size, 1),
                grid=lay.grid,
                segments=[lay.segments] if lay.grid is None or len(lay.grid) == 2 else None,
                signals={"importance": torch.ones(1, lay.size)},
            )
            try:
                segment_counts(bud, stub)
            except ValueError as err:
                raise ValueError(f"{modality} {j} (prompt {row}), {lay.size} tokens: {err}") from err

    def encode(self, inputs: dict[str, Any], modality: str, stage: str, signals: set[str]) -> Encoded:
        """Run the model's own ``get_image_features`` once; capture the projector's input and attention rows."""
        if modality != "image":
            raise ValueError(f"{type(self).__name__} handles images only, got modality {modality!r}")
        base = self.model.model
        counts = self._patch_counts(inputs)
        starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
        has_cls, drop_first = self._has_cls()
        row_fn = clip_attention_row(has_cls, drop_first)
        layers, where = self.layers(), self.signal_layers()
        hooks = {name: (layers[where[name]].self_attn, row_fn) for name in signals}
        if "cls_attn" not in signals:
            hooks["_thumb"] = (layers[where["cls_attn"]].self_attn, _rows_of(row_fn, starts))
        if stage == "vision":
            hooks["_vision"] = (base.multi_modal_projector, lambda m, a, k: a[0] if a else k["image_features"])
        kwargs = {"image_sizes": inputs["image_sizes"]}
        if inputs.get("batch_num_images") is not None:
            kwargs["batch_num_images"] = inputs["batch_num_images"]
        with torch.no_grad(), capture(hooks) as found:
            out = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kwargs)
        packed = list(out.pooler_output)
        names = sorted(signals)
        per_item = [
            torch.stack([found[n][0][s : s + c] for n in names], -1) if names else None
            for s, c in zip(starts.tolist(), counts, strict=True)
        ]
        lays = self.image_layouts(inputs, per_item if names else None)
        thumb = found["cls_attn"][0][starts] if "cls_attn" in signals else found["_thumb"][0]
        vision = None
        if stage == "vision" and all(lay.source is not None for lay in lays):
            v = found["_vision"][0]
            vision = [
                v[s : s + c].reshape(c * v.shape[1], -1)[lay.source.to(v.device)]
                for s, c, lay in zip(starts.tolist(), counts, lays, strict=True)
            ]
        device = packed[0].device
        sig: dict[str, list[torch.Tensor]] = {
            n: [lay.channels[:, 3 + i].to(device, torch.float32) for lay in lays] for i, n in enumerate(names)
        }
        sig["importance"] = [self.crop_importance(lay, thumb[j]).to(device) for j, lay in enumerate(lays)]
        feats = [p[lay.order.to(p.device)] for p, lay in zip(packed, lays, strict=True)]
        grids = [lay.grid for lay in lays]
        segments = [list(lay.segments) for lay in lays]
        return AnyResEncoded(
            feats, vision, base.multi_modal_projector, grids, sig, segments, layouts=lays, packed=packed
        )

    def _has_cls(self) -> tuple[bool, bool]:
        tower = self.model.model.vision_tower
        has_cls = any(hasattr(m, "class_embedding") for m in tower.modules())
        return has_cls, has_cls and self.config.vision_feature_select_strategy == "default"

    def crop_importance(self, layout: Layout, thumb_attn: torch.Tensor) -> torch.Tensor:
        """GlobalCom2's per-token weight: 1 on the thumbnail, ``1 + sigma_j - 1/n`` on crop ``j``.

        Args:
            layout: the image's layout.
            thumb_attn: ``[h*w]`` attention the thumbnail's CLS (or mean query) pays its tokens.

        Returns:
            ``[m]`` float32, constant within each segment (ones for an image without crops).
        """
        if layout.crops is None:
            return torch.ones(layout.size)
        rows, cols = layout.crops
        side = self._side
        a = thumb_attn.detach().float().cpu().reshape(side, side)
        # The thumbnail region of crop (r, c): GlobalCom2 splits the thumbnail grid evenly, the last
        # crop row / column taking the remainder.
        r = (torch.arange(side) // max(side // rows, 1)).clamp(max=rows - 1)
        c = (torch.arange(side) // max(side // cols, 1)).clamp(max=cols - 1)
        crop = (r[:, None] * cols + c[None, :]).flatten()
        s = torch.zeros(rows * cols).index_add_(0, crop, a.flatten())
        sigma = torch.softmax((s - s.max()) / float(self.crop_temperature), 0)
        weight = torch.cat([torch.ones(1), 1.0 + sigma - 1.0 / (rows * cols)])
        return weight[layout.crop_of]

    def kept_features(self, encoded: Encoded, plan: TokenPlan, stage: str) -> list[torch.Tensor]:
        """Per item, the ``[k_j + R_j, D]`` features in packed order: the kept tokens and every newline."""
        kept = super().kept_features(encoded, plan, stage)
        if not isinstance(encoded, AnyResEncoded):
            return kept
        return [
            lay.pack(plan.row_keep(j), k, p)
            for j, (lay, k, p) in enumerate(zip(encoded.layouts, kept, encoded.packed, strict=True))
        ]

    def splice(self, request: Request, plans: dict[str, TokenPlan], kept: dict[str, list[torch.Tensor]]) -> Spliced:
        """Map each compressor-order plan to the packed placeholders (newlines kept), then splice."""
        packed = {}
        for modality, plan in plans.items():
            lays = self.layouts(request.inputs, modality)
            seen, full = max(lay.size for lay in lays), max(lay.length for lay in lays)
            if plan.num_input == full:
                packed[modality] = plan
                continue
            if plan.num_input != seen:
                raise ValueError(
                    f"a {modality} plan over {plan.num_input} tokens fits neither the {seen} tokens the compressor "
                    f"sees nor the {full} placeholders of the packed sequence"
                )
            rows = [RowPlan(lay.packed_keep(plan.row_keep(j))) for j, lay in enumerate(lays)]
            packed[modality] = TokenPlan.from_rows(rows, full)
        return super().splice(request, packed, kept)


def _rows_of(fn: Any, starts: torch.Tensor) -> Any:
    """A hook function computing ``fn`` only for the batch rows ``starts`` (the thumbnails)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        h = args[0] if args else kwargs["hidden_states"]
        return fn(module, (h[starts.to(h.device)],), {})

    return hook
