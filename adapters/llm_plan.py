"""Checks and layer schedule of the ``llm`` stage, resolved before ``generate()`` runs.

:func:`mmtok.adapters.llm_stage.generate_with_llm_pruning` validates everything up front, so a bad call
fails before the model runs: the compressor (it must list ``"llm"`` among its stages and ask only for
:data:`SIGNALS`), the model (a decoder-only stack of full-attention layers), the ``generate()`` options
(one sequence per row, a cache), the ``[B, L]`` masks, the per-row budgets and the schedule
``[(attention layer, drop layer, per-row counts), ...]`` a compressor's ``llm_schedule`` returns (or the
single stage at ``layer`` for compressors without one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtok.compressors.base import Compressor
from mmtok.core.budget import as_budget, count_for

DEFAULT_LAYER = 2
# Signals this stage can give a compressor (besides features and sizes).
SIGNALS = frozenset({"features", "mask", "sizes", "metric", "text", "keys", "text_attn", "text_attn_all"})
UNSUPPORTED_GENERATE = ("input_ids", "inputs_embeds", "past_key_values", "attention_mask", "position_ids")


def as_mask(name: str, m: object, shape: tuple[int, ...]) -> torch.Tensor:
    """``m`` as a bool ``[B, L]`` tensor.

    Raises:
        ValueError: if ``m`` is not a tensor of exactly ``shape``.
    """
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != shape:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a [B, L] = {list(shape)} tensor, got {got}")
    return m.bool()


def row_counts(budget: object, n: list[int]) -> list[int]:
    """Visual tokens to keep per row: one budget for all rows or one per row (0 for rows without visual).

    Args:
        budget: an int, a fraction in (0, 1], a ``Budget(..., per="item")``, or a list / tuple of those.
        n: each row's number of visual tokens.

    Raises:
        ValueError: for a budget count that does not match the rows, a budget not per item, or one above
            a row's visual tokens.
    """
    per_row = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(n)
    if len(per_row) != len(n):
        raise ValueError(f"got {len(per_row)} budgets for {len(n)} rows; pass one budget or one per row")
    counts = []
    for b, (bud, nb) in enumerate(zip(per_row, n, strict=True)):
        bud = as_budget(bud)
        if bud.per != "item":
            raise ValueError(f"the llm stage takes per-item budgets, got Budget(per={bud.per!r}) for row {b}")
        counts.append(0 if nb == 0 else count_for(bud.value, nb, f"row {b}'s visual tokens"))
    return counts


def check_call(model: nn.Module, compressor: Compressor, gen: dict[str, Any]) -> nn.Module:
    """Validate the compressor, model and generate options; return the decoder stack.

    Raises:
        TypeError: if ``compressor`` is not an mmtok :class:`Compressor`.
        ValueError: for a compressor without the ``llm`` stage or needing other signals, a model without a
            full-attention decoder-only stack, or an unsupported ``generate()`` option.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be an mmtok Compressor, got {type(compressor).__name__}")
    name = compressor.name
    if "llm" not in compressor.stages:
        raise ValueError(f"compressor {name!r} cannot run inside the LLM; its stages: {list(compressor.stages)}")
    if missing := sorted(set(compressor.requires) - SIGNALS):
        raise ValueError(f"compressor {name!r} needs {missing}; the llm stage provides {sorted(SIGNALS)}")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(m, "self_attn") for m in layers):
        raise ValueError(f"{type(model).__name__} has no decoder-only stack (model.get_decoder().layers)")
    types = set(getattr(decoder.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ValueError(f"the llm stage supports full-attention layers only, this model has {sorted(types)}")
    if bad := sorted(set(gen) & set(UNSUPPORTED_GENERATE)):
        raise ValueError(f"pass {bad} as named arguments of generate_with_llm_pruning, not generate kwargs")
    gc = gen.get("generation_config") or getattr(model, "generation_config", None)
    for key in ("num_beams", "num_return_sequences"):
        if int(gen.get(key, getattr(gc, key, 1) or 1)) != 1:
            raise ValueError(f"the llm stage supports {key}=1 only (one sequence per row, no beam search)")
    if gen.get("use_cache", True) is False:
        raise ValueError("the llm stage needs use_cache=True: it prunes the KV cache")
    return decoder


def check_masks(
    embeds: object,
    attention_mask: torch.Tensor | None,
    visual_mask: torch.Tensor,
    text_mask: torch.Tensor | None,
    compressor: Compressor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the prompt embeddings and masks; return the real, visual and text tokens.

    Args:
        embeds: ``[B, L, D]`` float prompt embeddings, left padded.
        attention_mask: ``[B, L]``, 1 for real tokens; None when nothing is padded.
        visual_mask: ``[B, L]`` the tokens the compressor may drop.
        text_mask: ``[B, L]`` the text tokens; None for every real, non-visual token.
        compressor: the compressor (a row of text is required when it asks for ``text`` or
            ``text_attn_all``).

    Returns:
        ``(valid, vis, txt)``: three bool ``[B, L]`` tensors on the device of ``embeds``.

    Raises:
        ValueError: for a wrong shape or dtype, a last position that is padding or visual, visual
            padding, text that is padding or visual, or an empty text row a compressor needs.
    """
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or not torch.is_floating_point(embeds):
        raise ValueError("inputs_embeds must be a float [B, L, D] tensor")
    shape, dev = tuple(embeds.shape[:2]), embeds.device
    valid = torch.ones(shape, dtype=torch.bool, device=dev) if attention_mask is None else \
        as_mask("attention_mask", attention_mask, shape).to(dev)
    vis = as_mask("visual_mask", visual_mask, shape).to(dev)
    if not bool(valid[:, -1].all()) or bool(vis[:, -1].any()):
        raise ValueError("each row's last position must be a real, non-visual prompt token (left padding)")
    if bool((vis & ~valid).any()):
        raise ValueError("visual_mask marks padding positions")
    txt = valid & ~vis if text_mask is None else as_mask("text_mask", text_mask, shape).to(dev)
    if bool((txt & ~(valid & ~vis)).any()):
        raise ValueError("text_mask must mark real, non-visual tokens only")
    if {"text", "text_attn_all"} & compressor.requires and not bool(txt.any(1).all()):
        raise ValueError(f"compressor {compressor.name!r} needs text, and a row of text_mask is empty")
    return valid, vis, txt


def schedule(compressor: Compressor, layer: int | None, depth: int, n: list[int],
             k: list[int]) -> list[tuple[int, int, list[int]]]:
    """``[(attention layer, drop layer, per-row counts), ...]``, validated (0 for rows without visual).

    Args:
        compressor: one with ``llm_schedule(num_visual, budget, num_layers)`` picks its layers; any other
            runs once at ``layer``.
        layer: the drop layer for compressors without a schedule (None: :data:`DEFAULT_LAYER`).
        depth: the model's number of decoder layers.
        n: each row's number of visual tokens.
        k: each row's final count (:func:`row_counts`).

    Raises:
        ValueError: for ``layer`` given to a scheduled compressor or outside the model, a schedule whose
            layers are out of order, differ between rows or lie outside the model, or counts that grow,
            exceed a row's visual tokens or miss its budget.
    """
    name, scheduled = compressor.name, hasattr(compressor, "llm_schedule")
    if scheduled and layer is not None:
        raise ValueError(f"compressor {name!r} chooses its own layers; set its options, not layer=")
    layer = DEFAULT_LAYER if layer is None else layer
    if not scheduled and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth):
        raise ValueError(f"layer must be an int in [0, {depth - 1}] for this {depth}-layer model, not {layer!r}")
    plans = {b: compressor.llm_schedule(nb, kb, depth) if scheduled else [(layer, layer, kb)]
             for b, (nb, kb) in enumerate(zip(n, k, strict=True)) if nb}
    if not plans:
        return []
    shapes = {tuple((a, d) for a, d, _ in p) for p in plans.values()}
    pairs, prev = next(iter(shapes)), -1
    for a, d in pairs:
        if len(shapes) != 1 or not (max(prev, 0) <= a <= d < depth) or d == prev:
            raise ValueError(f"compressor {name!r}: invalid llm schedule {sorted(shapes)} for {depth} layers")
        prev = d
    for b, p in plans.items():
        c = [x for *_, x in p]
        if c[-1] != k[b] or min(c) < 1 or max(c) > n[b] or c != sorted(c, reverse=True):
            raise ValueError(f"compressor {name!r}: counts {c} for row {b} ({n[b]} visual, budget {k[b]})")
    rows = range(len(n))
    return [(a, d, [plans[b][s][2] if b in plans else 0 for b in rows]) for s, (a, d) in enumerate(pairs)]
