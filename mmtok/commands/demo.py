"""``mmtok demo``: the main job on the embedded default (``make demo``).

1. The shipped testbed model (``testbed-llava``, or ``--model DIR``) answers held-out questions of every
   image family with all its visual tokens and with a few compressors at one budget: answers beside the
   true ones, accuracy, visual tokens kept and prefill time (:mod:`mmtok.testbed.demo`). Without the model
   it says how to train or export it and goes on.
2. Every model-free image compressor on the bundled sample image at two budgets: the token budget table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtok.commands import compress
from mmtok.commands.compress import parse_budget

SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "sample_coffee.jpg"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok demo``."""
    p = sub.add_parser("demo", help="a testbed model answering questions with compressed visual tokens, "
                       "then every compressor on the bundled sample image")
    p.add_argument("--model", default="testbed-llava", help="testbed-llava (default) or an exported model directory")
    p.add_argument("--methods", nargs="+", default=None,
                   help="compressors to compare with identity (default: random divprune visionzip fastv)")
    p.add_argument("--budget", type=parse_budget, default=0.1,
                   help="visual tokens kept per image: a fraction in (0, 1] (default 0.1) or a count (26)")
    p.add_argument("--n", type=int, default=1, help="held-out questions per image family (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the demo's tensors are small "
                   "and more threads mostly add overhead; raise it for a large --model)")
    p.add_argument("--image", type=Path, default=SAMPLE, help="another image for the model-free table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the question-answering table (or how to get its model), then the sample's budget table."""
    import torch

    from mmtok.testbed.demo import DEMO_METHODS, check_budget, run_demo

    budget = check_budget(args.budget)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 held-out question per family, got {args.n}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if not args.image.is_file():
        raise FileNotFoundError(f"sample image not found: {args.image} (is this a full clone with assets/?)")
    run_demo(args.model, args.methods or list(DEMO_METHODS), budget, args.n)
    print()
    ns = argparse.Namespace(image=args.image, methods=None, budgets=[0.25, 64], grid=[24, 24], json=None)
    return compress.run(ns)
