"""``mmtok bench compressors|kernels``: benchmarks written as JSON and printed as a table."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUITES = ("compressors", "kernels")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok bench``."""
    p = sub.add_parser(
        "bench", help="benchmarks: compressors (CPU time per method) or kernels (Triton vs torch)"
    )
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="token counts N")
    p.add_argument("--methods", nargs="+", default=None, help="compressors (compressors suite)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction kept (compressors suite)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: bench_results/SUITE.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite, write its JSON, print its table."""
    out = args.out or Path("bench_results") / f"{args.suite}.json"
    mod = importlib.import_module(f"mmtok.bench.{args.suite}")
    kwargs: dict = {"repeats": args.repeats, "out_path": out}
    if args.sizes:
        kwargs["sizes"] = tuple(args.sizes)
    if args.suite == "compressors":
        kwargs.update(methods=args.methods, budget=args.budget)
    res = mod.run(**kwargs)
    print(f"machine: {res['machine']}")
    print(mod.to_markdown(res))
    print(f"\nwritten: {out}")
    return 0
