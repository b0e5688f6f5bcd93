"""``mmtok demo``: the main job on the embedded default.

Until the testbed models and the app land, this runs every image compressor on the bundled sample
image at two budgets and prints the token budget table (``make demo``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtok.commands import compress

SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "sample_coffee.jpg"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok demo``."""
    p = sub.add_parser("demo", help="run every compressor on the bundled sample image at two budgets")
    p.add_argument("--image", type=Path, default=SAMPLE, help="another image instead of the bundled sample")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the budget table for the sample at 25 % and 64 tokens."""
    if not args.image.is_file():
        raise FileNotFoundError(f"sample image not found: {args.image} (is this a full clone with assets/?)")
    ns = argparse.Namespace(image=args.image, methods=None, budgets=[0.25, 64], grid=[24, 24], json=None)
    return compress.run(ns)
