"""``mmtok generate``: compress a prompt's images / videos and generate with a vision-language model."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtok.commands.compress import parse_budget

DEFAULT_MODEL = "testbed-llava"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok generate``."""
    p = sub.add_parser("generate", help="compress the visual tokens of a prompt and generate an answer")
    p.add_argument("--model", default=DEFAULT_MODEL, help="testbed-<name>, a model directory or a cached hub id")
    p.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeat for more)")
    p.add_argument("--video", type=Path, action="append", default=[], help="a video file (repeat for more)")
    p.add_argument("--prompt", required=True, help="the question; '<image>' / '<video>' mark where media go")
    p.add_argument("--method", default="divprune", help="a compressor name (see `mmtok compressors`)")
    p.add_argument("--budget", type=parse_budget, default=0.25, help="tokens per item (64), a fraction (0.25) or 25%%")
    p.add_argument("--stage", choices=["vision", "pre_llm", "llm"], default=None, help="default: the method's own")
    p.add_argument("--compare", action="store_true", help="also run without compression and compare")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, help="e.g. float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--device-map", default=None, help="e.g. auto, cuda:0 (default: CPU)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, run ``compress_then_generate`` and print the answer and the token / timing table."""
    from mmtok.api import compress_then_generate, load

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for path in [*args.image, *args.video]:
        if not path.is_file():
            raise FileNotFoundError(f"media file not found: {path}")
    model, processor = load(args.model, dtype=args.dtype, device_map=args.device_map)
    result = compress_then_generate(
        model,
        processor,
        prompt=args.prompt,
        images=[str(p) for p in args.image] or None,
        videos=[str(p) for p in args.video] or None,
        method=args.method,
        budget=args.budget,
        stage=args.stage,
        compare=args.compare,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
    )
    print(f"answer: {result.text}")
    if result.baseline is not None:
        print(f"answer without compression: {result.baseline.text}")
    print()
    print(result.table())
    return 0
