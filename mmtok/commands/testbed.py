"""``mmtok testbed``: train, export and evaluate the offline testbed models (``testbed-llava`` ...)."""

from __future__ import annotations

import argparse

from mmtok.testbed.models import SPECS


def _budget(text: str) -> int | float:
    """``"64"`` -> 64 tokens, ``"0.1"`` -> 10 % (as ``compress_then_generate`` takes them)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an int (tokens) or a float in (0, 1], got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok testbed train | export | eval``."""
    p = sub.add_parser("testbed", help="train, export and evaluate the offline testbed models")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    names = sorted(SPECS)

    t = actions.add_parser("train", help="train a testbed model from its seed and export it to assets/")
    t.add_argument("name", choices=names)
    t.add_argument("--steps", type=int, help="optimiser steps (the spec's default when omitted)")
    t.add_argument("--batch-size", type=int, help="items per step (the spec's default when omitted)")
    t.add_argument("--lr", type=float, help="peak learning rate (the spec's default when omitted)")
    t.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    t.add_argument("--size", default="full", help="a size of the spec: full (shipped) or tiny")
    t.add_argument("--work-dir", help="checkpoints and log.jsonl (default /tmp/NAME)")
    t.add_argument("--out", help="export directory (default assets/NAME)")
    t.add_argument("--no-export", action="store_true", help="train and checkpoint only")
    t.add_argument("--resume", action="store_true", help="continue from WORK_DIR/checkpoint.pt")
    t.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    t.add_argument("--eval-n", type=int, default=16, help="held-out items per family in those evaluations")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers making batches (default 0)")
    t.set_defaults(run=run_train)

    e = actions.add_parser("export", help="export the latest checkpoint of a run (finished or not)")
    e.add_argument("name", choices=names)
    e.add_argument("--work-dir", help="where the run's checkpoint.pt is (default /tmp/NAME)")
    e.add_argument("--out", help="export directory (default assets/NAME)")
    e.set_defaults(run=run_export)

    v = actions.add_parser("eval", help="held-out accuracy per family through compress_then_generate")
    v.add_argument("name", help="a testbed name (e.g. testbed-llava) or a model directory")
    v.add_argument("--method", action="append", help="compressor (repeatable; default identity)")
    v.add_argument("--budget", type=_budget, action="append", help="tokens or fraction (repeatable; default 1.0)")
    v.add_argument("--n", type=int, default=16, help="held-out items per family (default 16)")
    v.add_argument("--form", default="mixed", choices=["short", "mc", "mixed"], help="question form")
    v.add_argument("--families", nargs="+", help="only these families")
    v.add_argument("--seed", type=int, default=0, help="held-out dataset seed (default 0)")
    v.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    v.add_argument("--markdown", action="store_true", help="print a markdown table")
    v.set_defaults(run=run_eval)


def run_train(args: argparse.Namespace) -> int:
    """Train (and export) one testbed model."""
    from mmtok.testbed.train import default_out, train

    out = None if args.no_export else (args.out or default_out(args.name))
    train(args.name, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=args.size,
          work_dir=args.work_dir, out=out, resume=args.resume, eval_every=args.eval_every, eval_n=args.eval_n,
          threads=args.threads, device=args.device, workers=args.workers, log=lambda line: print(line, flush=True))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export a run's latest checkpoint."""
    from mmtok.testbed.train import export_checkpoint

    print(f"exported to {export_checkpoint(args.name, args.work_dir, args.out)}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Print the accuracy table of every method x budget."""
    import mmtok
    from mmtok.testbed.evaluate import evaluate, format_reports, heldout

    model, processor = mmtok.load(args.name, dtype="float32")
    modalities = _modalities(args.name, model)
    items = heldout(modalities, args.n, args.seed, args.form, args.families)
    reports = [
        evaluate(model, processor, items, method=m, budget=b, batch_size=args.batch_size)
        for m in args.method or ["identity"] for b in args.budget or [1.0]
    ]
    print(format_reports(reports, markdown=args.markdown))
    return 0


def _modalities(name: str, model: object) -> tuple[str, ...]:
    if name in SPECS:
        return SPECS[name].modalities
    config = getattr(model, "config", None)
    found = [m for m, key in (("image", "image_token_id"), ("video", "video_token_id"), ("audio", "audio_token_id"))
             if getattr(config, key, None) is not None]
    if not found:
        raise ValueError(f"cannot tell which media {name!r} takes; pass a testbed name ({sorted(SPECS)})")
    return tuple(found)
