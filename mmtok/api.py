"""The public API: ``load`` a model and ``compress_then_generate`` with it.

Every consumer (the CLI, the app, the evaluator, the benchmarks) goes through
:func:`compress_then_generate`: the model's own processor and encoder, a compressor's plan, the plan
spliced into shorter inputs, and the model's own ``generate()``. Nothing is patched; the few hooks a
call registers (attention rows, timing, what the language model saw) are removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmtok.adapters import get_adapter
from mmtok.adapters.base import ATTENTION_SIGNALS, Adapter, Request, resolve_budgets
from mmtok.compressors import STAGES, Compressor, create_compressor
from mmtok.core import as_budget
from mmtok.core.budget import BudgetLike, count_for
from mmtok.loading import (  # noqa: F401 - the public loading API lives in mmtok.loading
    ROOT,
    ProcessorParts,
    load,
    load_processor,
    missing_files,
    model_class,
    resolve_path,
)
from mmtok.result import Result


def compress_then_generate(
    model: Any,
    processor: Any = None,
    *,
    prompt: str | Sequence[str],
    images: Any = None,
    videos: Any = None,
    audios: Any = None,
    method: str | Compressor = "divprune",
    budget: BudgetLike | Sequence[BudgetLike] = 0.25,
    stage: str | None = None,
    compare: bool = False,
    **generate_kwargs: Any,
) -> Result:
    """Compress a prompt's visual tokens and generate with the model's own ``generate()``.

    Args:
        model: a loaded model, or a name / directory / hub id for :func:`load`.
        processor: its processor (loaded with the model when ``model`` is a name).
        prompt: one prompt or a list of prompts (a batch). A prompt holds one placeholder per item
            (the model's own, or ``"<image>"`` / ``"<video>"``), or none, in which case it is put in
            the model's chat template with its media first.
        images: per prompt, an image (path, ``PIL.Image``), a list of images or None.
        videos: per prompt, a video (path, ``[T, H, W, 3]`` frames), a list of videos or None.
        audios: per prompt, audio clips, for models that take them.
        method: a registered compressor name or a :class:`mmtok.Compressor`.
        budget: tokens to keep per image / video (int), a fraction (float), a :class:`mmtok.Budget`,
            or a list with one per prompt.
        stage: ``"vision"``, ``"pre_llm"`` or ``"llm"``; the method's default when None.
        compare: also run without compression and attach it as ``result.baseline``.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens`` defaults to 64).

    Returns:
        A :class:`mmtok.Result`.

    Raises:
        ValueError: an unsupported model, an unknown method or stage, a prompt whose placeholders do not
            match its media, an unreadable file, or a budget larger than an item's tokens; all raised
            before any model code runs.
    """
    if isinstance(model, (str, Path)):
        model, loaded = load(model)
        processor = processor if processor is not None else loaded
    adapter = get_adapter(model, processor)
    compressor = create_compressor(method) if isinstance(method, str) else method
    if not isinstance(compressor, Compressor):
        raise TypeError(f"method must be a compressor name or an mmtok.Compressor, got {type(method).__name__}")
    stage = stage or compressor.stage
    if stage not in STAGES or stage not in compressor.stages:
        raise ValueError(f"compressor {compressor.name!r} runs at stages {list(compressor.stages)}, not {stage!r}")
    if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
        generate_kwargs["max_new_tokens"] = 64
    t0 = time.perf_counter()
    request = adapter.prepare(prompt, images=images, videos=videos, audios=audios)
    budgets = resolve_budgets(budget, request.batch_size)
    for m in request.modalities if stage != "llm" else ():
        adapter.check_budget(request, budgets, m)
    if stage == "llm":
        check_llm_budgets(request, budgets)
    prepare_s = time.perf_counter() - t0
    if stage == "llm":
        result = run_llm_stage(adapter, request, compressor, budgets, generate_kwargs)
    else:
        result = run_compressed(adapter, request, compressor, budgets, stage, generate_kwargs)
    result.timings["prepare"] = prepare_s
    if compare:
        identity = create_compressor("identity")
        result.baseline = run_compressed(adapter, request, identity, budgets, "pre_llm", generate_kwargs)
        result.baseline.timings["prepare"] = prepare_s
    return result


def needed_signals(compressor: Compressor, budgets: list[BudgetLike]) -> set[str]:
    """The attention signals to compute: those the method requires, and ``cls_attn`` for adaptive budgets."""
    need = {s for s in compressor.requires if s in ATTENTION_SIGNALS}
    if any(as_budget(b).allocation == "adaptive" for b in budgets):
        need.add("cls_attn")
    return need


def run_compressed(
    adapter: Adapter,
    request: Request,
    compressor: Compressor,
    budgets: list[BudgetLike],
    stage: str,
    generate_kwargs: dict[str, Any],
) -> Result:
    """Encode, plan, splice and generate for a prepared request; measure every step.

    Args:
        adapter: the model's adapter.
        request: from ``adapter.prepare``; its budgets already checked.
        compressor: the method.
        budgets: one per prompt row.
        stage: ``"vision"`` or ``"pre_llm"``.
        generate_kwargs: for ``model.generate``.
    """
    device = adapter.device
    meter = MemoryMeter(device)
    signals = needed_signals(compressor, budgets)
    timings = {"encode": 0.0, "compress": 0.0}
    plans, kept, grids = {}, {}, {}
    start = time.perf_counter()
    for m in request.modalities:
        t = time.perf_counter()
        encoded = adapter.encode(request.inputs, m, stage, signals)
        _sync(device)
        timings["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        tokens = adapter.visual_tokens(request, encoded, stage, m)
        plans[m] = adapter.plan(compressor, tokens, adapter.item_budgets(request, budgets, m))
        kept[m] = adapter.kept_features(encoded, plans[m], stage)
        grids[m] = list(encoded.grids)
        _sync(device)
        timings["compress"] += time.perf_counter() - t
    t = time.perf_counter()
    spliced = adapter.splice(request, plans, kept)
    timings["compress"] += time.perf_counter() - t
    out, gen_t, seen = generate_timed(adapter, spliced.kwargs, generate_kwargs)
    timings.update(gen_t)
    timings["total"] = time.perf_counter() - start
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[:, spliced.kwargs["input_ids"].shape[1] :]
    texts = adapter.decode(new)
    tokens_info: dict[str, dict[str, list[int]]] = {}
    for m in plans:
        after = [0] * request.batch_size
        for j, row in enumerate(request.item_rows[m]):
            after[row] += int(kept[m][j].shape[0])  # newline tokens the adapter keeps count too
        tokens_info[m] = {"before": request.tokens_per_row(m), "after": after}
    tokens_info["sequence"] = {"before": spliced.before, "after": spliced.after, "seen": seen}
    return Result(
        text=texts[0] if request.single else texts,
        tokens=tokens_info,
        timings=timings,
        peak_memory_bytes=meter.peak(),
        plans={m: p.to("cpu") for m, p in plans.items()},
        item_rows={m: list(request.item_rows[m]) for m in plans},
        grids=grids,
        method=compressor.name,
        budget=budgets[0] if all(b == budgets[0] for b in budgets) else list(budgets),
        stage=stage,
        sequences=new,
        output=None if isinstance(out, torch.Tensor) else out,
    )


def check_llm_budgets(request: Request, budgets: list[BudgetLike]) -> None:
    """At the ``llm`` stage a budget covers all of a row's visual tokens (every image and video together).

    Raises:
        ValueError: a per-frame / per-crop budget, or an int budget above a row's visual tokens.
    """
    totals = [sum(n) for n in zip(*(request.tokens_per_row(m) for m in request.modalities), strict=True)]
    for b, (bud, n) in enumerate(zip(budgets, totals or [0] * len(budgets), strict=True)):
        bud = as_budget(bud)
        if bud.per != "item":
            raise ValueError(f"the llm stage takes per-item budgets, got Budget(per={bud.per!r}) for prompt {b}")
        if n:
            count_for(bud.value, n, f"prompt {b}'s {n} visual tokens")


def run_llm_stage(
    adapter: Adapter, request: Request, compressor: Compressor, budgets: list[BudgetLike], generate_kwargs: dict[str, Any]
) -> Result:
    """The ``llm`` stage: full features merged into the embeddings, visual tokens dropped inside the LM.

    The model's own encoder fills every placeholder (as the stock forward does); the in-LLM pruning
    (:func:`mmtok.adapters.llm_stage.generate_with_llm_pruning`) then drops visual hidden states and their
    KV entries at the method's layers, under the model's own ``generate()``.
    """
    from mmtok.adapters.llm_stage import generate_with_llm_pruning

    model, inputs, device = adapter.model, request.inputs, adapter.device
    meter = MemoryMeter(device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    start = time.perf_counter()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        kinds = torch.zeros_like(ids)
        for i, m in enumerate(request.modalities, 1):
            feats = torch.cat(full_features(adapter, request, m)).to(embeds.dtype)
            where = ids == adapter.token_id(m)
            embeds = embeds.masked_scatter(where.unsqueeze(-1).expand_as(embeds), feats)
            kinds[where] = i
    _sync(device)
    encode_s = time.perf_counter() - start
    protected = adapter.protected_mask(inputs).to(kinds.device) & mask.bool()
    visual = (kinds > 0) & mask.bool() & ~protected
    with record_seen(model) as seen:
        out, info = generate_with_llm_pruning(
            model, inputs_embeds=embeds, attention_mask=mask, position_ids=adapter.positions(inputs),
            visual_mask=visual, compressor=compressor, budget=budgets, **generate_kwargs,
        )
    before = [int(v) for v in mask.sum(1).tolist()]
    timings = {"encode": encode_s, **info["timings"]}
    timings["total"] = time.perf_counter() - start
    sequences = out.sequences if hasattr(out, "sequences") else out
    tokens_info: dict[str, dict[str, list[int]]] = {}
    for i, m in enumerate(request.modalities, 1):
        after = []
        for b in range(request.batch_size):
            row_kinds = kinds[b][visual[b]]
            kept_here = int((row_kinds[info["kept_visual"][b].to(row_kinds.device)] == i).sum())
            after.append(kept_here + int(((kinds[b] == i) & protected[b]).sum()))
        tokens_info[m] = {"before": request.tokens_per_row(m), "after": after}
    dropped = [v0 - v1 for v0, v1 in zip(info["visual_before"], info["visual_after"], strict=True)]
    tokens_info["sequence"] = {
        "before": before, "after": [n - d for n, d in zip(before, dropped, strict=True)], "seen": list(seen),
        "kv": list(info["kv_lengths"]),
    }
    texts = adapter.decode(sequences)
    return Result(
        text=texts[0] if request.single else texts, tokens=tokens_info, timings=timings,
        peak_memory_bytes=meter.peak(), method=compressor.name,
        budget=budgets[0] if all(b == budgets[0] for b in budgets) else list(budgets), stage="llm",
        sequences=sequences, output=None if isinstance(out, torch.Tensor) else out,
    )


def full_features(adapter: Adapter, request: Request, modality: str) -> list[torch.Tensor]:
    """Per item, every placeholder's feature in the model's packing order (newline tokens included)."""
    encoded = adapter.encode(request.inputs, modality, "pre_llm", set())
    tokens = adapter.visual_tokens(request, encoded, "pre_llm", modality)
    keep_all = [1.0] * request.batch_size
    plan = adapter.plan(create_compressor("identity"), tokens, adapter.item_budgets(request, keep_all, modality))
    return adapter.kept_features(encoded, plan, "pre_llm")


def generate_timed(
    adapter: Adapter, inputs: dict[str, Any], generate_kwargs: dict[str, Any]
) -> tuple[Any, dict[str, float], list[int]]:
    """``model.generate(**inputs)`` timing prefill (to the first token) and decode, recording what the LM saw.

    Returns:
        ``(generate's output, {"prefill": s, "decode": s}, per-row valid prompt length seen by the LM)``.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    device = adapter.device
    marks: list[float] = []

    class FirstToken(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not marks:
                _sync(device)
                marks.append(time.perf_counter())
            return scores

    kwargs = dict(generate_kwargs)
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(FirstToken())
    with record_seen(adapter.model) as seen:
        t = time.perf_counter()
        out = adapter.model.generate(**inputs, logits_processor=processors, **kwargs)
        _sync(device)
        end = time.perf_counter()
    first = marks[0] if marks else end
    return out, {"prefill": first - t, "decode": end - first}, seen


@contextlib.contextmanager
def record_seen(model: Any) -> Iterator[list[int]]:
    """Record the per-row valid length of the first input the language model receives (the prefill).

    Yields:
        A list filled, once the prefill ran, with one length per row (read from the LM's own input).
    """
    seen: list[int] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if seen:
            return
        emb = kwargs.get("inputs_embeds")
        ref = emb if emb is not None else kwargs["input_ids"]
        length = ref.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length:
            seen.extend(int(v) for v in mask.sum(1).tolist())
        else:
            seen.extend([int(length)] * ref.shape[0])

    handle = language_model(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def language_model(model: Any) -> torch.nn.Module:
    """The decoder stack a VLM feeds its merged embeddings to."""
    base = getattr(model, "model", model)
    lm = getattr(base, "language_model", None)
    if lm is None:
        raise ValueError(f"cannot find the language model of {type(model).__name__}")
    return lm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory over a span: CUDA's allocator peak, or the process's peak RSS on Linux (VmHWM).

    On a CPU it resets the process's peak-RSS counter (``/proc/self/clear_refs``) when it starts, so the
    peak covers this span only; the figure includes the weights and everything else the process holds.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> int | None:
        """Peak bytes since construction (None where it cannot be read)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
        found = re.search(r"VmHWM:\s+(\d+)\s*kB", status)
        return int(found.group(1)) * 1024 if found else None
