"""``mmtok compress``: run compressors on an image and print the token budget table."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmtok.compressors import compressor_class, create_compressor, list_compressors
from mmtok.core import as_budget, segment_counts
from mmtok.pixel_encoder import pixel_tokens
from mmtok.table import format_table

STANDIN_NOTE = (
    "tokens: 14x14 pixel patches of the image (no model); cls_attn: pixel saliency stand-in; "
    "text: the mean patch as a query-agnostic stand-in. Use `mmtok generate --model ...` for a real VLM."
)


def parse_budget(text: str) -> int | float:
    """``"64"`` -> 64 tokens, ``"0.25"`` -> 25 %, ``"25%"`` -> 25 %."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text) if "." in text else int(text)
    except ValueError as err:
        raise ValueError(
            f"a budget is an int (tokens), a fraction like 0.25 or a percentage like 25%, got {text!r}"
        ) from err


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok compress``."""
    p = sub.add_parser("compress", help="run compressors on an image and print the token budget table")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("--methods", nargs="+", default=None, help="compressors to run (default: all image ones)")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[0.25, 64], help="e.g. 64 0.25 10%%")
    p.add_argument("--grid", type=int, nargs=2, default=[24, 24], metavar=("H", "W"), help="tokens per side")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.set_defaults(run=run)


def model_free_methods() -> list[str]:
    """Image compressors that run without a model: those usable before the language model.

    In-LLM methods (``fastv``, ``pdrop``, ``sparsevlm``) rank by the language model's own attention,
    which a model-free tokenisation cannot provide; they run through ``mmtok generate``.
    """
    before_llm = set(list_compressors(stage="vision")) | set(list_compressors(stage="pre_llm"))
    return [n for n in list_compressors(modality="image") if n in before_llm]


def compress_table(
    image: Path, methods: list[str] | None, budgets: list[int | float], grid: tuple[int, int]
) -> dict:
    """Run each method at each budget on ``image``; returns ``{"n": N, "budgets": [...], "rows": [...]}``."""
    names = methods or model_free_methods()
    for n in names:
        compressor_class(n)
    tokens = pixel_tokens(image, grid=grid)
    resolved = [segment_counts(as_budget(b), tokens)[0][0][1] for b in budgets]
    rows = []
    for name in names:
        comp = create_compressor(name)
        row = {"method": name, "stage": comp.stage, "requires": sorted(comp.requires), "kept": [], "ms": []}
        for b in budgets:
            t0 = time.perf_counter()
            plan = comp(tokens, b)
            row["ms"].append((time.perf_counter() - t0) * 1e3)
            row["kept"].append(int(plan.counts[0]))
        rows.append(row)
    return {
        "image": str(image),
        "n": tokens.num_tokens,
        "budgets": budgets,
        "targets": resolved,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> int:
    """Print the table; write JSON when asked."""
    res = compress_table(args.image, args.methods, args.budgets, tuple(args.grid))
    heads = [f"{b} ({k})" for b, k in zip(res["budgets"], res["targets"], strict=True)]
    header = [
        "method",
        "stage",
        "requires",
        *[f"kept @ {h}" for h in heads],
        *[f"ms @ {b}" for b in res["budgets"]],
    ]
    body = [
        [r["method"], r["stage"], ",".join(r["requires"]) or "-", *r["kept"], *[round(m, 2) for m in r["ms"]]]
        for r in res["rows"]
    ]
    print(f"{res['image']}: {res['n']} tokens ({args.grid[0]}x{args.grid[1]})")
    print(format_table(header, body))
    print(f"\n{STANDIN_NOTE}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(args.json)
    return 0
