"""``mmtok bench e2e``: time to first token and peak memory of ``compress_then_generate`` on full-size models.

The models and media are described in :mod:`mmtok.bench.e2e_models` (a LLaVA-OneVision-0.5B-shaped and
a Qwen2.5-VL-3B-shaped model with random weights; a 384x384 image and a 16-frame video).

Runs: for each medium, ``identity`` (the full run, 100 %) and every method at each budget below 100 %,
all through :func:`mmtok.compress_then_generate` (greedy, a few new tokens, end-of-text disabled so
every run decodes the same number). Reported per run: visual tokens, the length the language model
received, and the API's own timings: ``encode`` (vision tower + projector, with any attention row a
method needs), ``compress`` (plan + splice; at the ``llm`` stage the in-LLM scoring and dropping),
``prefill`` (time to first token of ``generate()``; at the ``llm`` stage the decoder stack's prefill)
and ``ttft`` (prepare + encode + compress + prefill: the caller's wait for the first token), and the
peak resident memory of the process during the call (weights included).

Goals (issue 3), checked on the video at 10 %: prefill time <= 0.2x the full run's, and the
compressor's own time <= 5 % of the prefill time it saves.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mmtok.bench.e2e_models import build, load_media, prompt
from mmtok.bench.timing import machine, write_json
from mmtok.table import format_table

METHODS = ("divprune", "visionzip", "fastv")  # one per stage: pre_llm, vision, llm
BUDGETS = (1.0, 0.5, 0.25, 0.1)
MEDIA = ("image", "video")
GOAL_PREFILL_RATIO = 0.2
GOAL_COMPRESS_SHARE = 0.05
GOAL_MEDIA, GOAL_BUDGET = "video", 0.1


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(
    model: Any, processor: Any, medium: str, item: Any, method: str, budget: float, repeats: int,
    max_new_tokens: int,
) -> dict:
    """Run one (medium, method, budget) ``repeats`` times; the median of each timing and the largest peak."""
    from mmtok.api import compress_then_generate

    runs, loads = [], []
    for _ in range(max(1, repeats)):
        loads.append(os.getloadavg()[0])
        rss = _rss()
        kw = {"images": item} if medium == "image" else {"videos": item}
        res = compress_then_generate(
            model, processor, prompt=prompt(medium), method=method, budget=budget,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, **kw,
        )
        runs.append((res, rss))
    res = runs[-1][0]
    keys = ("prepare", "encode", "compress", "prefill", "decode", "total")
    timings = {k: statistics.median(r.timings.get(k, 0.0) for r, _ in runs) for k in keys}
    peaks = [r.peak_memory_bytes for r, _ in runs if r.peak_memory_bytes is not None]
    rss = [b for _, b in runs if b is not None]
    seq = res.tokens["sequence"]
    visual = {k: res.total_tokens(medium, k) for k in ("before", "after")}
    return {
        "media": medium, "method": method, "stage": res.stage, "budget": budget, "visual_tokens": visual,
        "lm_input_tokens": int(seq["seen"][0]), "lm_tokens_after": int(seq["after"][0]),
        "timings_s": timings,
        "ttft_s": timings["prepare"] + timings["encode"] + timings["compress"] + timings["prefill"],
        "peak_memory_bytes": max(peaks) if peaks else None,
        "rss_before_bytes": max(rss) if rss else None,
        "runs": len(runs), "load_avg_1min": loads,
    }


def sweep(
    net: Any, processor: Any, items: dict[str, Any], media: tuple[str, ...], plan: list[tuple[str, float]],
    repeats: int, max_new_tokens: int, say: Any, failed: dict[tuple[str, str], str],
) -> list[dict]:
    """:func:`measure` every (medium, method, budget) of ``plan``; a failing run is recorded, not raised.

    A (medium, method) pair that failed once (or in ``failed``, from :func:`preflight`) is not run again:
    its other budgets are recorded with the same error. ``failed`` is updated in place.
    """
    results = []
    for medium in media:
        for method, budget in plan:
            error = {"media": medium, "method": method, "budget": budget}
            if (medium, method) in failed:
                results.append({**error, "error": failed[medium, method]})
                continue
            try:
                rec = measure(net, processor, medium, items[medium], method, budget, repeats, max_new_tokens)
            except Exception as err:  # a benchmark sweep records a broken path and goes on
                failed[medium, method] = f"{type(err).__name__}: {err}"
                say(f"{medium:5s} {method:9s} {budget:4.2f}: FAILED {failed[medium, method]}")
                results.append({**error, "error": failed[medium, method]})
                continue
            results.append(rec)
            say(f"{medium:5s} {method:9s} {budget:4.2f}: prefill {rec['timings_s']['prefill']:.2f} s, "
                f"encode {rec['timings_s']['encode']:.2f} s, load {rec['load_avg_1min'][0]:.1f}")
    return results


def preflight(model: str, media: tuple[str, ...], plan: list[tuple[str, float]], say: Any) -> dict:
    """Run each (medium, method) once on the tiny build of the same model: ``{(medium, method): error}``.

    A broken code path is then found in a second instead of after a full-size encode.
    """
    net, processor, _ = build(model, tiny=True)
    items, _ = load_media(tiny=True)
    lowest = {m: b for m, b in sorted(plan, key=lambda p: -p[1])}
    failed: dict[tuple[str, str], str] = {}
    sweep(net, processor, items, media, list(lowest.items()), 1, 1, lambda line: None, failed)
    for (medium, method), err in failed.items():
        say(f"preflight: {method} on the {medium} fails on the tiny model, skipped at full size: {err}")
    return failed


def goal_checks(results: list[dict], media: str = GOAL_MEDIA, budget: float = GOAL_BUDGET) -> dict:
    """The issue's goals for every method run on ``media`` at ``budget``, against the ``identity`` run.

    Per method: ``prefill_ratio`` = its prefill / the full run's (goal <= 0.2); ``saved_s`` = the full
    prefill minus its prefill; ``compress_share`` = its ``compress`` time / ``saved_s`` (goal <= 0.05; None
    when nothing was saved, which fails the goal); ``encode_extra_s`` = its encode minus the full run's
    (the attention rows a vision-stage method needs, clipped at 0; timing noise shows here too) and
    ``compress_share_with_signals`` = (compress + encode_extra) / saved.

    Raises:
        ValueError: there is no ``identity`` run at budget 1.0 on ``media``.
    """
    fulls = [r for r in results if r["media"] == media and r["method"] == "identity" and r["budget"] == 1.0]
    full = next((r for r in fulls if "error" not in r), None)
    if full is None:
        raise ValueError(f"the goals need the full (identity, budget 1.0) run on the {media}")
    base = full["timings_s"]
    methods = {}
    for r in results:
        if r["media"] != media or r["method"] == "identity" or abs(r["budget"] - budget) > 1e-9:
            continue
        if "error" in r:
            methods[r["method"]] = {"error": r["error"], "met": False}
            continue
        t = r["timings_s"]
        ratio = t["prefill"] / base["prefill"] if base["prefill"] > 0 else None
        saved = base["prefill"] - t["prefill"]
        extra = max(0.0, t["encode"] - base["encode"])
        share = t["compress"] / saved if saved > 0 else None
        with_signals = (t["compress"] + extra) / saved if saved > 0 else None
        ratio_met = ratio is not None and ratio <= GOAL_PREFILL_RATIO
        share_met = share is not None and share <= GOAL_COMPRESS_SHARE
        methods[r["method"]] = {
            "stage": r["stage"], "prefill_s": t["prefill"], "prefill_ratio": ratio,
            "prefill_ratio_met": ratio_met, "saved_s": saved, "compress_s": t["compress"],
            "compress_share": share, "compress_share_met": share_met, "encode_extra_s": extra,
            "compress_share_with_signals": with_signals, "met": ratio_met and share_met,
        }
    return {
        "media": media, "budget": budget, "prefill_ratio_max": GOAL_PREFILL_RATIO,
        "compress_share_max": GOAL_COMPRESS_SHARE, "full_prefill_s": base["prefill"],
        "full_encode_s": base["encode"],
        "methods": methods, "met_by": [m for m, v in methods.items() if v["met"]],
        "all_met": bool(methods) and all(v["met"] for v in methods.values()),
    }


def run(
    model: str = "onevision-0.5b",
    methods: list[str] | tuple[str, ...] | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    media: tuple[str, ...] = MEDIA,
    repeats: int = 1,
    max_new_tokens: int = 4,
    frames: int | None = None,
    vocab: int | None = None,
    tiny: bool = False,
    warmup: bool = True,
    threads: int | None = None,
    out_path: Path | None = None,
    log: Any = None,
) -> dict:
    """Build the model, run every (medium, method, budget), check the goals; returns (and writes) the report.

    Args:
        model: one of :data:`MODELS`.
        methods: compressor names (default :data:`METHODS`); ``identity`` runs at 1.0 regardless.
        budgets: fractions of each item's visual tokens; 1.0 is the ``identity`` run, the others run
            every method.
        media: ``"image"`` and / or ``"video"``.
        repeats: runs per setting (the median of each timing is kept).
        max_new_tokens: tokens generated per run.
        frames: video frames (default 16; 4 when ``tiny``).
        vocab: the LM vocabulary (default the real 151936).
        tiny: toy sizes through the same code path (for tests).
        warmup: one untimed run (the first medium, the lowest budget) before the timed ones.
        threads: torch's intra-op threads during the runs (restored after); torch's default when None.
        out_path: where to write the JSON (atomically), or None.
        log: a callable taking one line of progress, or None.

    Returns:
        ``{"bench": "e2e", "machine", "model", "media", "settings", "results": [...], "goals", "wall_s"}``.

    Raises:
        ValueError: an unknown model / medium, a budget outside (0, 1], an unknown method, or
            ``threads`` below 1.
    """
    from mmtok.compressors import list_compressors

    names = list(methods or METHODS)
    unknown = sorted(set(names) - set(list_compressors()))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(list_compressors())}")
    bad = [m for m in media if m not in MEDIA]
    if bad or not media:
        raise ValueError(f"media must be among {MEDIA}, got {list(media)}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1], got {list(budgets)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    say = log or (lambda line: None)
    start, load = time.perf_counter(), list(os.getloadavg())
    plan = [("identity", 1.0)] + [(m, b) for b in sorted(set(budgets), reverse=True) if b < 1.0 for m in names
                                   if m != "identity"]
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        host = machine()
        failed = {} if tiny else preflight(model, media, plan, say)
        net, processor, info = build(model, tiny=tiny, vocab=vocab)
        say(f"built {model} ({info['parameters'] / 1e6:.0f}M parameters) in {info['build_s']:.1f} s")
        items, media_info = load_media(tiny, frames)
        if warmup:  # first-call costs (thread pools, allocator growth) stay out of the first timed run
            first = next(((m, b) for m, b in reversed(plan) if (media[0], m) not in failed), None)
            if first is not None:
                sweep(net, processor, items, media[:1], [first], 1, 1, lambda line: None, {})
        results = sweep(net, processor, items, media, plan, repeats, max_new_tokens, say, failed)
    finally:
        torch.set_num_threads(default_threads)
    for rec in results:
        full = next((r for r in results if r["media"] == rec["media"] and r["method"] == "identity"), None)
        if "error" in rec or full is None or "error" in full:
            continue
        p = full["timings_s"]["prefill"]
        rec["prefill_vs_full"] = rec["timings_s"]["prefill"] / p if p > 0 else None
    try:
        goals = goal_checks(results) if GOAL_MEDIA in media else None
    except ValueError as err:
        goals = {"error": str(err)}
    out = {
        "bench": "e2e", "machine": host, "model": info, "media": media_info,
        "settings": {
            "methods": names, "budgets": list(budgets), "repeats": repeats, "max_new_tokens": max_new_tokens,
            "load_avg_at_start": load,
        },
        "results": results,
        "goals": goals,
        "wall_s": time.perf_counter() - start,
    }
    if out_path is not None:
        write_json(out, out_path)
    return out


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.0f}"


def to_markdown(res: dict) -> str:
    """One row per run, then one line per goal check."""
    rows = []
    for r in res["results"]:
        if "error" in r:
            err = "error: " + r["error"][:60]
            rows.append([r["media"], r["method"], "-", f"{r['budget']:.0%}", err, *["-"] * 7])
            continue
        t = r["timings_s"]
        v = r["visual_tokens"]
        peak = r["peak_memory_bytes"]
        rows.append([
            r["media"], r["method"], r["stage"], f"{r['budget']:.0%}", f"{v['before']} -> {v['after']}",
            f"{r['lm_input_tokens']} -> {r['lm_tokens_after']}", _ms(t["encode"]), _ms(t["compress"]),
            _ms(t["prefill"]), "-" if r.get("prefill_vs_full") is None else f"{r['prefill_vs_full']:.2f}x",
            _ms(r["ttft_s"]), "-" if peak is None else f"{peak / 2**20:,.0f}",
        ])
    head = ["media", "method", "stage", "budget", "visual tokens", "LM tokens", "encode ms", "compress ms",
            "prefill ms", "prefill vs full", "TTFT ms", "peak MiB"]
    lines = [format_table(head, rows, markdown=True)]
    goals = res.get("goals")
    if goals and "error" in goals:
        lines.append(f"\nGoals not checked: {goals['error']}")
    elif goals:
        lines.append(
            f"\nGoals on the {goals['media']} at {goals['budget']:.0%} (full prefill "
            f"{goals['full_prefill_s'] * 1e3:,.0f} ms): prefill <= {goals['prefill_ratio_max']}x full, "
            f"compressor time <= {goals['compress_share_max']:.0%} of the prefill time saved"
        )
        for name, g in goals["methods"].items():
            if "error" in g:
                lines.append(f"- {name}: NOT met, the run failed: {g['error']}")
                continue
            share = "-" if g["compress_share"] is None else f"{g['compress_share']:.2%}"
            sig = g["compress_share_with_signals"]
            sig = "-" if sig is None else f"{sig:.2%}"
            ratio = "-" if g["prefill_ratio"] is None else f"{g['prefill_ratio']:.3f}x"
            met = "met" if g["prefill_ratio_met"] else "NOT met"
            lines.append(
                f"- {name} ({g['stage']}): prefill {ratio} [{met}]; "
                f"compress {_ms(g['compress_s'])} ms = {share} of {_ms(g['saved_s'])} ms saved "
                f"[{'met' if g['compress_share_met'] else 'NOT met'}] ({sig} counting the extra encode time "
                f"{_ms(g['encode_extra_s'])} ms)"
            )
    return "\n".join(lines)
