"""``mmtok bench compressors|kernels|e2e|testbed``: benchmarks written as JSON and printed as a table."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUITES = ("compressors", "kernels", "e2e", "testbed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok bench``."""
    p = sub.add_parser(
        "bench",
        help="benchmarks: compressors (CPU time per method), kernels (Triton vs torch), e2e (time to first "
        "token and peak memory of compress_then_generate on full-size random-weight models) or testbed (a testbed "
        "training step with the attention supervision read through eager attention or query_rows)",
    )
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="token counts N")
    p.add_argument("--methods", nargs="+", default=None, help="compressors (compressors suite)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction kept (compressors suite)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3; e2e 1)")
    p.add_argument("--model", default="onevision-0.5b", help="e2e: onevision-0.5b or qwen2.5-vl-3b")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="e2e: fractions (default 1 .5 .25 .1)")
    p.add_argument("--media", nargs="+", default=None, choices=("image", "video"), help="e2e: media to run")
    p.add_argument("--frames", type=int, default=None, help="e2e: video frames (default 16)")
    p.add_argument("--new-tokens", type=int, default=4, help="e2e: tokens generated per run")
    p.add_argument("--vocab", type=int, default=None, help="e2e: LM vocabulary (default the real 151936)")
    p.add_argument("--threads", type=int, default=None, help="e2e: torch threads (default: torch's own)")
    p.add_argument("--tiny", action="store_true", help="e2e: toy sizes through the same code path")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: bench_results/SUITE.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite, write its JSON, print its table."""
    out = args.out or Path("bench_results") / f"{args.suite}.json"
    mod = importlib.import_module(f"mmtok.bench.{args.suite}")
    kwargs: dict = {"out_path": out}
    if args.repeats is not None:
        kwargs["repeats"] = args.repeats
    if args.sizes:
        kwargs["sizes"] = tuple(args.sizes)
    if args.suite == "compressors":
        kwargs.update(methods=args.methods, budget=args.budget)
    if args.suite == "e2e":
        kwargs.update(
            model=args.model, methods=args.methods, max_new_tokens=args.new_tokens, frames=args.frames,
            vocab=args.vocab, tiny=args.tiny, threads=args.threads, log=lambda line: print(line, flush=True),
        )
        if args.budgets:
            kwargs["budgets"] = tuple(args.budgets)
        if args.media:
            kwargs["media"] = tuple(args.media)
    res = mod.run(**kwargs)
    print(f"machine: {res['machine']}")
    print(mod.to_markdown(res))
    print(f"\nwritten: {out}")
    return 0
