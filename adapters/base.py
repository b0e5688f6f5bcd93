"""The adapter contract and the model-agnostic half of every adapter: inputs, signals, plans, splicing.

A model adapter says where a model keeps its encoder, projector and placeholder ids, how it numbers
positions and how to hand those positions to ``generate()``; everything else (reading media, checking
prompts, building :class:`mmtok.VisualTokens`, applying a :class:`mmtok.TokenPlan` to the features and
to ``input_ids`` / ``attention_mask`` / positions, left padding) lives here, once.

Hooks a subclass provides (stable; every adapter implements them the same way):

* ``placeholder(modality) -> str``: the text the processor expects where one item goes.
* ``token_id(modality) -> int``: the id the processor repeats once per LLM token of an item.
* ``item_lengths(inputs, modality, count) -> list[int]``: LLM tokens of each item, from the processor's
  outputs, before any encoder runs.
* ``encode(inputs, modality, stage, signals) -> Encoded``: the model's own encoder on the processed
  media, with the attention-row hooks for the requested ``signals``.

Hooks with a working default a subclass may override: ``process(prompts, media)`` (the processor call),
``check_budget(request, budgets, modality)`` (budgets against token counts, before any encoder runs),
``positions(inputs)`` (the stock position ids), ``finish(kwargs, lengths)`` (last touches to the
``generate()`` kwargs), ``signal_layers()`` and ``load(modality, item)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmtok.adapters import media as media_io
from mmtok.adapters.batching import left_padding, pad_items, resolve_budgets, row_tokens, same_budget
from mmtok.core import RowPlan, TokenPlan, VisualTokens, as_budget
from mmtok.core.budget import BudgetLike, count_for

ATTENTION_SIGNALS = ("cls_attn", "mid_attn")
__all__ = ["Adapter", "Encoded", "Request", "Spliced", "left_padding", "pad_items", "resolve_budgets"]
MEDIA_ARGS = {"image": "images", "video": "videos", "audio": "audios"}


@dataclass
class Request:
    """A validated batch of prompts and media, processed by the model's own processor.

    Attributes:
        prompts: the ``B`` prompts as the processor saw them (placeholders in the model's format).
        single: whether the caller passed one prompt as a ``str`` (the result's text is then a ``str``).
        media: per modality, per prompt row, the loaded items in prompt order.
        item_rows: per modality, the prompt row of each item, in the order the model consumes them.
        item_lengths: per modality, the number of LLM placeholder tokens of each item.
        inputs: the processor's tensors on the model's device (``input_ids`` ``[B, L]``,
            ``attention_mask`` ``[B, L]``, pixel values, grids, ...), left-padded.
    """

    prompts: list[str]
    single: bool
    media: dict[str, list[list[Any]]]
    item_rows: dict[str, list[int]]
    item_lengths: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of prompts ``B``."""
        return len(self.prompts)

    @property
    def modalities(self) -> list[str]:
        """The modalities that have at least one item, in a fixed order."""
        return [m for m in MEDIA_ARGS if self.item_rows.get(m)]

    def tokens_per_row(self, modality: str) -> list[int]:
        """``[B]`` placeholder tokens of ``modality`` in each prompt row."""
        out = [0] * self.batch_size
        for r, n in zip(self.item_rows.get(modality, []), self.item_lengths.get(modality, []), strict=True):
            out[r] += n
        return out


@dataclass
class Encoded:
    """What the model's own encoder produced for one modality, item by item.

    Attributes:
        features: per item, ``[n_j, D]`` features in the language model's input space (after the
            projector), in placeholder order.
        vision: per item, ``[n_j, Cv]`` features before the projector (offered at the ``vision`` stage),
            or None when the encoder's output already is the language model's input (Qwen2-VL's merger).
        project: the model's own projector, ``[n, Cv] -> [n, D]``, applied after a vision-stage plan.
        grids: per item, the ``(H, W)`` or ``(T, H, W)`` layout of its tokens, or None.
        signals: per signal name (``"cls_attn"``, ``"mid_attn"``), per item a ``[n_j]`` tensor.
        segments: per item, the lengths of its segments (frames, crops) or None for the default.
    """

    features: list[torch.Tensor]
    vision: list[torch.Tensor] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    grids: list[tuple[int, ...] | None] = field(default_factory=list)
    signals: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    segments: list[list[int]] | None = None


@dataclass
class Spliced:
    """The shorter inputs for ``generate()`` and what they contain.

    Attributes:
        kwargs: ``input_ids`` ``[B, L']``, ``attention_mask`` ``[B, L']``, ``position_ids``
            (``[B, L']`` or ``[P, B, L']``), ``mm_encoder_outputs`` and model-specific extras.
        before: ``[B]`` valid sequence length of each row before compression.
        after: ``[B]`` valid sequence length of each row after compression.
    """

    kwargs: dict[str, Any]
    before: list[int]
    after: list[int]


class Adapter(abc.ABC):
    """Base class of the model adapters; subclasses fill in the model-specific hooks (see the module doc).

    Class variables:
        model_types: the ``config.model_type`` values the adapter serves.
        modalities: the modalities it can compress (keys of every per-modality dict).
        sequence_keys: the ``[B, L]`` processor outputs that follow ``input_ids`` when tokens are dropped.
        video_frames: frames sampled from a video file.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    video_frames: ClassVar[int] = 8

    def __init__(self, model: Any, processor: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config

    # ------------------------------------------------------------------ model-specific hooks

    @abc.abstractmethod
    def placeholder(self, modality: str) -> str:
        """The text the processor expects where one item of ``modality`` goes (e.g. ``"<image>"``)."""

    @abc.abstractmethod
    def token_id(self, modality: str) -> int:
        """The id of the placeholder token the processor repeats once per LLM token of an item."""

    @abc.abstractmethod
    def item_lengths(self, inputs: dict[str, Any], modality: str, count: int) -> list[int]:
        """LLM placeholder tokens of each of the ``count`` items, from the processor's outputs."""

    @abc.abstractmethod
    def encode(self, inputs: dict[str, Any], modality: str, stage: str, signals: set[str]) -> Encoded:
        """Run the model's own encoder (and the signal hooks for ``signals``) on the processed media."""

    def positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The stock model's position ids of the unpruned sequence: ``[B, L]`` or ``[P, B, L]``."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def protected_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, L]`` bool: placeholder columns no stage may drop (e.g. LLaVA-NeXT's newlines); none by default."""
        return torch.zeros_like(inputs["input_ids"], dtype=torch.bool)

    def finish(self, kwargs: dict[str, Any], lengths: torch.Tensor) -> None:
        """Last model-specific touches to the ``generate()`` kwargs (e.g. Qwen's ``rope_deltas``); none by default."""
        return None

    def signal_layers(self) -> dict[str, int]:
        """The vision layer each attention signal is computed at (``{"cls_attn": i, "mid_attn": j}``)."""
        return {}

    def load(self, modality: str, item: Any) -> Any:
        """Read one media item (a path is decoded now, so a bad file fails before anything runs)."""
        if modality == "image":
            return media_io.load_image(item)
        if modality == "video":
            return media_io.load_video(item, self.video_frames)
        return item

    def process(self, prompts: list[str], media: dict[str, list[Any]]) -> dict[str, Any]:
        """Run the model's processor on the prompts and the flat per-modality item lists (left padding)."""
        kw: dict[str, Any] = {}
        if media.get("image"):
            kw["images"] = media["image"]
        if media.get("video"):
            kw["videos"] = [v.frames for v in media["video"]]
        with left_padding(self.tokenizer):
            out = self.processor(text=prompts, padding=True, return_tensors="pt", **kw)
        return self.to_device(dict(out))

    # ------------------------------------------------------------------ inputs

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        """The device of the model's input embeddings."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's input embeddings."""
        return self.model.get_input_embeddings().weight.dtype

    def to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Move tensors to the model's device; floating-point ones to its dtype."""
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def chat_prompt(self, text: str, counts: dict[str, int]) -> str | None:
        """``text`` in the model's chat template with ``counts`` items of each modality first, or None."""
        proc = self.processor
        template = getattr(proc, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template or not hasattr(proc, "apply_chat_template"):
            return None
        content = [{"type": m} for m, n in counts.items() for _ in range(n)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return str(proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def prepare(self, prompt: str | Sequence[str], images: Any = None, videos: Any = None, audios: Any = None) -> Request:
        """Validate prompts and media, read the media, and run the processor (left padding).

        Args:
            prompt: one prompt or a list of prompts. A prompt holds one placeholder per item, in the order
                the items are given: the model's own (e.g. ``"<image>"``) or the generic ``"<image>"`` /
                ``"<video>"``. A prompt with media but no placeholder is put in the model's chat template
                with its media first.
            images: for one prompt an image or a list of images; for a list of prompts a list with one
                entry per prompt (an image, a list of images or None). An image is a path, a
                ``PIL.Image`` or anything the processor accepts.
            videos: the same for videos: a path, an array ``[T, H, W, 3]`` or a list of frames.
            audios: the same for audio clips.

        Raises:
            ValueError: a prompt's placeholders do not match its media, a file cannot be decoded, the
                model does not take a modality, or a prompt is empty.
            FileNotFoundError: a media path does not exist.
        """
        if self.processor is None:
            raise ValueError("compressing needs the model's processor: pass processor=... (mmtok.load() returns both)")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        given = {"image": images, "video": videos, "audio": audios}
        rows: dict[str, list[list[Any]]] = {}
        for m, value in given.items():
            if value is None:
                continue
            if m not in self.modalities:
                raise ValueError(
                    f"{self.config.model_type} models take no {MEDIA_ARGS[m]} here; "
                    f"supported modalities: {', '.join(self.modalities)}"
                )
            rows[m] = media_io.per_row(value, len(prompts), single, MEDIA_ARGS[m])
        markers = {m: self.placeholder(m) for m in self.modalities}
        for m in self.modalities:
            rows.setdefault(m, [[] for _ in prompts])
        prompts = media_io.normalise_prompts(prompts, rows, markers, self.chat_prompt)
        loaded = {m: [[self.load(m, x) for x in items] for items in rows[m]] for m in self.modalities}
        flat = {m: [x for items in loaded[m] for x in items] for m in self.modalities}
        item_rows = {m: [b for b, items in enumerate(loaded[m]) for _ in items] for m in self.modalities}
        inputs = self.process(prompts, flat)
        req = Request(prompts, single, loaded, item_rows, inputs=inputs)
        for m in self.modalities:
            if flat[m]:
                lengths = self.item_lengths(inputs, m, len(flat[m]))
                got = [r for r, _ in self.spans(inputs, m, lengths)]
                if got != item_rows[m]:
                    raise ValueError(
                        f"{m} items landed in prompt rows {got} but were given for rows {item_rows[m]}; "
                        "check the placeholders"
                    )
                req.item_lengths[m] = lengths
        return req

    def spans(self, inputs: dict[str, Any], modality: str, lengths: list[int]) -> list[tuple[int, torch.Tensor]]:
        """Each item's ``(row, columns)``: the placeholder columns the model fills with its features.

        The model fills placeholders in row-major order with the items' features in item order, so the
        ``j``-th run of ``lengths[j]`` placeholders (in that order) belongs to item ``j``.

        Raises:
            ValueError: the placeholder count differs from ``sum(lengths)`` or an item spans two rows.
        """
        where = (inputs["input_ids"] == self.token_id(modality)).nonzero()
        if where.shape[0] != sum(lengths):
            raise ValueError(
                f"the processed prompts hold {where.shape[0]} {modality} placeholder tokens but the "
                f"{len(lengths)} item(s) need {sum(lengths)}; does a prompt contain expanded placeholders?"
            )
        out, start = [], 0
        for n in lengths:
            rows = where[start : start + n, 0]
            if bool((rows != rows[0]).any()):
                raise ValueError(f"{modality} item {len(out)} spans two prompts; check the placeholders")
            out.append((int(rows[0]), where[start : start + n, 1]))
            start += n
        return out

    # ------------------------------------------------------------------ tokens and plans

    def check_budget(self, request: Request, budgets: list[BudgetLike], modality: str = "image") -> None:
        """Check each item's budget (its prompt row's) against its token count before any encoder runs.

        Args:
            request: the prepared batch.
            budgets: one budget per prompt row (see :func:`resolve_budgets`).
            modality: the items to check.

        Raises:
            ValueError: an int budget is larger than an item's tokens.
        """
        for j, (row, n) in enumerate(
            zip(request.item_rows[modality], request.item_lengths[modality], strict=True)
        ):
            bud = as_budget(budgets[row])
            if bud.per == "item":
                count_for(bud.value, n, f"{modality} {j} (prompt {row}, {n} tokens)")

    @staticmethod
    def item_budgets(request: Request, budgets: list[BudgetLike], modality: str) -> list[BudgetLike]:
        """Each item's budget: the budget of the prompt row it belongs to."""
        return [budgets[row] for row in request.item_rows[modality]]

    def visual_tokens(self, request: Request, encoded: Encoded, stage: str, modality: str = "image") -> VisualTokens:
        """Batch the items' tokens and signals into :class:`VisualTokens` (one row per item).

        At the ``vision`` stage the features are the encoder's (before the projector) when the model has
        a separate projector; ``text`` (the prompt's text-token embeddings ``[T, D]``) is supplied
        whenever the features live in the language model's input space.
        """
        items = encoded.vision if stage == "vision" and encoded.vision is not None else encoded.features
        feats, mask = pad_items(items)
        grids = encoded.grids if encoded.grids and all(g is not None for g in encoded.grids) else None
        if grids is not None and any(math.prod(g) != x.shape[0] for g, x in zip(grids, items, strict=True)):
            grids = None
        signals = {k: pad_items(v)[0].to(feats.dtype) for k, v in encoded.signals.items()}
        cls_attn = signals.pop("cls_attn", None)
        text = text_mask = None
        if items is encoded.features:
            text, text_mask = self._text(request, modality)
        return VisualTokens(
            feats,
            grid=grids,
            cls_attn=cls_attn,
            text=text,
            text_mask=text_mask,
            mask=mask,
            segments=encoded.segments,
            signals=signals,
        )

    def _text(self, request: Request, modality: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ids, mask = request.inputs["input_ids"], request.inputs["attention_mask"].bool()
        for m in self.modalities:
            mask = mask & (ids != self.token_id(m))
        with torch.no_grad():
            emb = self.model.get_input_embeddings()(ids)
        per = [emb[r][mask[r]] for r in request.item_rows[modality]]
        if any(t.shape[0] == 0 for t in per):
            return None, None
        return pad_items(per)

    @staticmethod
    def plan(compressor: Any, tokens: VisualTokens, budgets: list[BudgetLike]) -> TokenPlan:
        """Run the compressor with one budget per row; rows with different budgets are planned one by one."""
        if all(same_budget(b, budgets[0]) for b in budgets):
            return compressor(tokens, budgets[0])
        rows = []
        for j, bud in enumerate(budgets):
            p = compressor(row_tokens(tokens, j), bud)
            n = int(tokens.lengths[j])
            rows.append(RowPlan(p.row_keep(0), p.assign[0, :n] if p.merging else None))
        return TokenPlan.from_rows(rows, tokens.num_tokens, tokens.sizes)

    def kept_features(self, encoded: Encoded, plan: TokenPlan, stage: str) -> list[torch.Tensor]:
        """Per item, the ``[k_j, D]`` features the language model will see, in kept-placeholder order."""
        vision = stage == "vision" and encoded.vision is not None
        items = encoded.vision if vision else encoded.features
        x, _ = pad_items(items)
        out = plan.apply(x.to(plan.keep.device))
        kept = [out[j, : int(plan.mask[j].sum())] for j in range(len(items))]
        if vision:
            if encoded.project is None:
                raise ValueError("a vision-stage plan needs the model's projector; the adapter gave none")
            with torch.no_grad():
                kept = [encoded.project(k) for k in kept]
        return kept

    # ------------------------------------------------------------------ splicing

    def splice(self, request: Request, plans: dict[str, TokenPlan], kept: dict[str, list[torch.Tensor]]) -> Spliced:
        """Drop the placeholders of the dropped tokens and hand the kept features to ``generate()``.

        Every other token, and every kept placeholder (a merged group's representative), keeps its
        original position id (Qwen's 3-D M-RoPE ids included); rows are left-padded to the longest.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = request.inputs
        mask = inputs["attention_mask"].bool()
        keep = mask.clone()
        for modality, plan in plans.items():
            for j, (row, cols) in enumerate(self.spans(inputs, modality, request.item_lengths[modality])):
                drop = torch.ones(cols.numel(), dtype=torch.bool, device=cols.device)
                drop[plan.row_keep(j).to(cols.device)] = False
                keep[row, cols[drop]] = False
        positions = self.positions(inputs)
        before, after = mask.sum(1), keep.sum(1)
        length = int(after.max())
        index = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
        new_mask = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
        for b in range(keep.shape[0]):
            cols = keep[b].nonzero().squeeze(1)
            index[b, length - cols.numel() :] = cols
            new_mask[b, length - cols.numel() :] = 1
        kwargs: dict[str, Any] = {}
        for key in self.sequence_keys:
            if key not in inputs:
                continue
            if key == "attention_mask":
                kwargs[key] = new_mask.to(inputs[key].dtype)
                continue
            fill = self.pad_id() if key == "input_ids" else 0
            kwargs[key] = torch.gather(inputs[key], 1, index).masked_fill(new_mask == 0, fill)
        pos_index = index.expand(*positions.shape[:-2], -1, -1) if positions.dim() == 3 else index
        kwargs["position_ids"] = torch.gather(positions, -1, pos_index).masked_fill(new_mask == 0, 0)
        kwargs["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=list(f)) for m, f in kept.items()}
        self.finish(kwargs, after)
        return Spliced(kwargs, before.tolist(), after.tolist())

    def pad_id(self) -> int:
        """The tokenizer's pad id (0 when it has none)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Decode generated token ids ``[B, T]`` to text."""
        return [str(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
