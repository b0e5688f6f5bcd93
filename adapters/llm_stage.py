"""The ``llm`` stage: drop visual tokens inside the language model at layer K, under its own generate().

FastV, PyramidDrop, SparseVLM and DART let the first decoder layers see every token and remove visual
tokens from the rest. Here the stock model's own ``generate()`` runs the prefill and every decoding step;
no class is patched. For the call only, hooks sit on the decoder stack (``model.get_decoder()``) and layers:

* at a stage's attention layer, a pre-hook computes the few attention rows the method needs with that
  layer's own norm, q/k projections and rotary embedding (the model keeps its kernel: SDPA stays SDPA);
* at its drop layer, a pre-hook runs the compressor on :class:`mmtok.VisualTokens` of the hidden states,
  gathers the kept positions (size-weighted means where the plan merges) and gives that layer and the later
  ones the shorter ``hidden_states``, ``position_embeddings``, ``position_ids`` and a causal mask from
  transformers' ``create_causal_mask``;
* after the prefill every layer's KV cache is cut to the final kept positions (a merged token keeps its
  representative's entries below the merge), one length for all layers; while decoding, the stack's
  pre-hook swaps in the reduced 2-D attention mask. ``generate()`` numbers new tokens after the full prompt
  (Qwen2-VL's M-RoPE ids too), so kept tokens keep their original positions, as in the stock model.

Decoding steps attend, at every layer, to the kept prompt tokens and the generated ones. The hooks are
removed in ``finally``, also when ``generate()`` fails. The checks and the schedule live in
:mod:`mmtok.adapters.llm_plan`, the per-layer tensor work (attention rows, the shortened sequence,
the KV-cache cut) in :mod:`mmtok.adapters.llm_layers`; this module holds the entry point and the hooks.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mmtok.adapters.llm_layers import attention_rows, left_padded_index, shortened_kwargs, trim_kv_cache
from mmtok.adapters.llm_plan import DEFAULT_LAYER, SIGNALS, check_call, check_masks, row_counts, schedule
from mmtok.compressors.base import Compressor
from mmtok.core import VisualTokens
from mmtok.core.budget import BudgetLike

__all__ = ["DEFAULT_LAYER", "SIGNALS", "generate_with_llm_pruning"]


def generate_with_llm_pruning(
    model: nn.Module,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    visual_mask: torch.Tensor,
    compressor: Compressor,
    budget: BudgetLike | Sequence[BudgetLike],
    text_mask: torch.Tensor | None = None,
    layer: int | None = None,
    **generate_kwargs: Any,
) -> tuple[torch.LongTensor, dict[str, Any]]:
    """Generate with ``model.generate()`` while visual tokens are dropped inside the language model.

    Args:
        model: a generation model whose ``get_decoder()`` is a decoder-only stack with ``.layers`` of
            full-attention blocks (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, Llava and Qwen2-VL
            ``*ForConditionalGeneration``, ...), under any attention implementation.
        inputs_embeds: ``[B, L, D]`` prompt embeddings with the visual features in place, left padded
            (each row's last position is its last prompt token).
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding; None when nothing is padded.
        position_ids: optional, for ``generate()``: ``[B, L]``, or Qwen2-VL's ``[3, B, L]`` / ``[4, B, L]``
            M-RoPE ids of the unpruned prompt; omitted, ``generate()`` derives them from the mask.
        visual_mask: ``[B, L]`` bool, the tokens the compressor may drop (all of a row's images and videos
            form one :class:`VisualTokens` row); never padding or the last position; rows may have none.
        compressor: a compressor whose ``stages`` include ``"llm"``. One with ``llm_schedule(num_visual,
            budget, num_layers) -> [(attention_layer, drop_layer, kept), ...]`` (fastv, pdrop, sparsevlm)
            picks its layers; any other (dart, identity) runs once at ``layer``.
        budget: visual tokens per row after the last stage: an int, a fraction in (0, 1], a
            ``Budget(..., per="item")``, or one of those per row (ragged budgets).
        text_mask: ``[B, L]`` bool, the text tokens (``VisualTokens.text``, the queries of
            ``signals["text_attn_all"]``); default every real, non-visual token.
        layer: drop layer index for compressors without a schedule (default 2, DART's; 0 = before the
            first layer); an error for compressors with one (set their option instead).
        **generate_kwargs: for ``model.generate()`` (``max_new_tokens``, ``do_sample``, ...); no beam
            search or several return sequences; the default (dynamic) cache.

    Returns:
        ``(sequences, info)``: what ``generate()`` returned (new tokens, or its output object with
        ``return_dict_in_generate=True``) and a dict: ``visual_before`` / ``visual_after`` (per row),
        ``stages`` (``attn_layer``, ``drop_layer``, per-row ``counts`` and ``kept_positions``),
        ``kept_visual`` (per row, indices among the row's visual tokens of those kept, a merged group's
        representative included), ``kept_positions`` (their prompt indices), ``merged``, ``kv_length``
        (every layer's cache length after the prefill, padded over rows), ``kv_lengths`` (per row) and
        ``timings`` in seconds (``prefill``, ``compress``, ``decode``, ``total``).

    Raises:
        TypeError / ValueError: bad inputs, an unsupported model, compressor or generate option, a budget
            above a row's visual tokens, a layer the model lacks; raised before anything runs.
    """
    run = _Run.prepare(
        model, inputs_embeds, attention_mask, visual_mask, text_mask, compressor, budget, layer,
        generate_kwargs,
    )
    if position_ids is not None:
        generate_kwargs["position_ids"] = position_ids
    start = time.perf_counter()
    with run.attached():
        sequences = model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
    _sync(inputs_embeds.device)
    return sequences, run.info(start, time.perf_counter())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """The state of one call: schedule, the current (shortened) sequence, and the hooks."""

    def __init__(self, decoder: nn.Module, compressor: Compressor, stages: list[tuple[int, int, list[int]]],
                 valid: torch.Tensor, vis: torch.Tensor, txt: torch.Tensor, n: list[int]) -> None:
        self.decoder, self.layers, self.compressor, self.stages = decoder, decoder.layers, compressor, stages
        self.mask, self.vis, self.txt, self.n, self.length = valid, vis, txt, n, vis.shape[1]
        self.sizes = torch.ones(vis.shape, dtype=torch.float32, device=vis.device)
        self.orig = torch.arange(vis.shape[1], device=vis.device).expand(vis.shape).clone()
        self.visual0 = [vis[b].nonzero().flatten() for b in range(vis.shape[0])]
        self.phase, self.cache, self.overrides, self.merged = "idle", None, None, False
        self.signals: dict[str, torch.Tensor] = {}
        self.drops: list[tuple[int, torch.Tensor]] = []  # (drop layer, [B, L_new] slots in previous sequence)
        self.counts = [list(c) for *_, c in stages]
        self.stage_kept: list[list[torch.Tensor]] = [[] for _ in stages]
        self.times = {"prefill": 0.0, "compress": 0.0, "t0": 0.0, "t1": 0.0}
        self.kv_length = vis.shape[1]

    @classmethod
    def prepare(cls, model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                visual_mask: torch.Tensor, text_mask: torch.Tensor | None, compressor: Compressor,
                budget: object, layer: int | None, gen: dict[str, Any]) -> _Run:
        """Validate everything and resolve the schedule, before anything runs."""
        decoder = check_call(model, compressor, gen)
        valid, vis, txt = check_masks(embeds, attention_mask, visual_mask, text_mask, compressor)
        n = vis.sum(1).tolist()
        stages = schedule(compressor, layer, len(decoder.layers), n, row_counts(budget, n))
        return cls(decoder, compressor, stages, valid, vis, txt, n)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Hooks on the decoder stack and its layers for the duration of the block, removed in ``finally``."""
        handles = []
        try:
            if self.stages:
                handles.append(self.decoder.register_forward_pre_hook(self._stack_pre, with_kwargs=True))
                handles.append(self.decoder.register_forward_hook(self._stack_post, with_kwargs=True))
                for i in range(self.stages[0][0], len(self.layers)):
                    handles.append(self.layers[i].register_forward_pre_hook(partial(self._layer_pre, i),
                                                                             with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ hooks

    def _stack_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            names = list(inspect.signature(module.forward).parameters)
            kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        if x is None or x.shape[0] != self.vis.shape[0]:
            raise ValueError("the llm stage saw a batch of a different size (beam search or several return "
                             "sequences are not supported)")
        if self.phase == "idle":
            if kwargs.get("past_key_values") is None or x.shape[1] != self.vis.shape[1]:
                raise ValueError("the llm stage expects generate() to prefill the whole prompt into a cache")
            self.phase, self.cache = "prefill", kwargs["past_key_values"]
            _sync(x.device)
            self.times["t0"] = time.perf_counter()
            return ((), kwargs) if args else None
        if self.phase == "decode":
            extra = self.cache.get_seq_length() + x.shape[1] - self.mask.shape[1]
            ones = torch.ones(self.mask.shape[0], extra, dtype=torch.long, device=x.device)
            kwargs["attention_mask"] = torch.cat([self.mask.long().to(x.device), ones], dim=1)
            return (), kwargs
        return None

    def _stack_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.phase != "prefill":
            return
        self.kv_length = trim_kv_cache(self.cache, self.drops, self.mask, self.length)
        self.phase = "decode"
        _sync(self.mask.device)
        self.times["t1"] = time.perf_counter()
        self.times["prefill"] = self.times["t1"] - self.times["t0"]

    def _layer_pre(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.phase != "prefill":
            return None
        h = args[0] if args else kwargs["hidden_states"]
        if self.overrides is not None:
            kwargs = {**kwargs, **self.overrides}
        start = time.perf_counter()
        if h.device != self.mask.device:  # layers spread over devices (device_map)
            for name in ("mask", "vis", "txt", "sizes", "orig"):
                setattr(self, name, getattr(self, name).to(h.device))
        if any(i in (a, d) for a, d, _ in self.stages) and kwargs.get("position_embeddings") is None:
            raise ValueError(f"{type(module).__name__} gets no position_embeddings; unsupported by the llm stage")
        for s, (a, d, counts) in enumerate(self.stages):
            if a == i:
                with torch.no_grad():
                    self.signals = self._signals(module, h, kwargs)
            if d == i:
                with torch.no_grad():
                    h, kwargs = self._drop(s, h, kwargs, counts)
        if any(i in (a, d) for a, d, _ in self.stages):
            _sync(h.device)
            self.times["compress"] += time.perf_counter() - start
        if self.overrides is None:
            return None
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    # ------------------------------------------------------------------ signals and drops

    def _signals(self, layer: nn.Module, h: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
        """Pre-RoPE keys ``[B, L, Hkv*d]`` and the attention rows the compressor requires."""
        attn, need = layer.self_attn, self.compressor.requires
        x = layer.input_layernorm(h)
        b, length, _ = x.shape
        hd = int(attn.head_dim)
        keys = attn.k_proj(x).view(b, length, -1, hd)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        out = {"keys": keys.flatten(2)}
        if not ({"text_attn", "text_attn_all"} & need):
            return out
        last = torch.full((b, 1), length - 1, dtype=torch.long, device=x.device)
        if "text_attn_all" in need:
            t_max = int(self.txt.sum(1).max())
            order = torch.argsort((~self.txt).to(torch.int8), dim=1, stable=True)[:, :t_max]
            last = torch.cat([last, order], dim=1)
        probs = attention_rows(attn, x, keys, kwargs["position_embeddings"], last, self.mask)
        if "text_attn" in need:
            out["text_attn"] = probs[:, 0]
        if "text_attn_all" in need:
            out["text_attn_all"] = probs[:, 1:]
        return out

    def _drop(self, s: int, h: torch.Tensor, kwargs: dict, counts: list[int]) -> tuple[torch.Tensor, dict]:
        """Run the compressor on each row, then shorten the sequence and the layer kwargs."""
        bsz, length, dim = h.shape
        rows, merges, changed = [], {}, False
        for b in range(bsz):
            vis = self.vis[b].nonzero().flatten()
            keep = vis
            if 0 < counts[b] < vis.numel():
                plan = self.compressor(self._tokens(b, h, vis), counts[b])
                keep = vis[plan.row_keep(0)]
                if plan.merging:
                    feats = plan.apply(h[b, vis][None], reduce="mean")[0, : keep.numel()]
                    merges[b] = (keep, feats, plan.sizes[0, : keep.numel()].to(self.sizes.device))
                changed = changed or keep.numel() < vis.numel() or plan.merging
            self.counts[s][b] = int(keep.numel())
            other = (self.mask[b] & ~self.vis[b]).nonzero().flatten()
            rows.append(torch.sort(torch.cat([other, keep])).values)
        if not changed:
            self._record(s)
            return h, kwargs
        g, mask = left_padded_index(rows, h.device)
        new_len = g.shape[1]
        h_new = h.gather(1, g[..., None].expand(-1, -1, dim))
        self.sizes = torch.where(mask, self.sizes.gather(1, g), torch.ones_like(mask, dtype=torch.float32))
        for b, (keep, feats, sizes) in merges.items():
            at = new_len - rows[b].numel() + torch.searchsorted(rows[b], keep)
            h_new[b, at] = feats.to(h.dtype)
            self.sizes[b, at] = sizes
            self.merged = True
        self.vis, self.txt = self.vis.gather(1, g) & mask, self.txt.gather(1, g) & mask
        self.orig, self.mask = self.orig.gather(1, g), mask
        self.drops.append((self.stages[s][1], g))
        self.overrides = shortened_kwargs(self.decoder.config, kwargs, h_new, g, mask)
        self._record(s)
        return h_new, {**kwargs, **self.overrides}

    def _record(self, s: int) -> None:
        self.stage_kept[s] = [self.orig[b][self.vis[b]] for b in range(self.vis.shape[0])]

    def _tokens(self, b: int, h: torch.Tensor, vis: torch.Tensor) -> VisualTokens:
        txt = self.txt[b].nonzero().flatten()
        signals = {"keys": self.signals["keys"][b, vis][None]}
        if "text_attn" in self.signals:
            signals["text_attn"] = self.signals["text_attn"][b, vis][None].contiguous()
        if "text_attn_all" in self.signals:
            rows = self.signals["text_attn_all"][b, : txt.numel()][:, vis]
            signals["text_attn_all"] = rows.T[None].contiguous()
        return VisualTokens(h[b, vis][None], sizes=self.sizes[b, vis][None],
                            text=h[b, txt][None] if txt.numel() else None, signals=signals)

    def info(self, start: float, end: float) -> dict[str, Any]:
        """The per-call report (see :func:`generate_with_llm_pruning`)."""
        kept_pos = [self.orig[b][self.vis[b]] for b in range(self.vis.shape[0])]
        kept_vis = [torch.searchsorted(v0, p.to(v0.device)) for v0, p in zip(self.visual0, kept_pos, strict=True)]
        stages = [{"attn_layer": a, "drop_layer": d, "counts": c, "kept_positions": kp}
                  for (a, d, _), c, kp in zip(self.stages, self.counts, self.stage_kept, strict=True)]
        decode = end - self.times["t1"] if self.phase == "decode" else 0.0
        return {"visual_before": list(self.n), "visual_after": [int(v.numel()) for v in kept_vis],
                "stages": stages, "kept_visual": kept_vis, "kept_positions": kept_pos, "merged": self.merged,
                "kv_length": int(self.kv_length), "kv_lengths": self.mask.sum(1).tolist(),
                "timings": {"prefill": self.times["prefill"], "compress": self.times["compress"],
                            "decode": decode, "total": end - start}}

