"""``mmtok testbed``: train, export and evaluate the offline testbed models (``testbed-llava`` ...)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mmtok.testbed.models import SPECS

if TYPE_CHECKING:
    import torch


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


def _layers(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers (e.g. 1,2), got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok testbed train | export | eval | report``."""
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
    t.add_argument("--init-from", help="warm start from another run's checkpoint.pt or work dir, or an exported "
                   "directory with training.json (fresh schedule)")
    t.add_argument("--eval-every", type=int, default=None,
                   help="steps between held-out evaluations (default: a sixth of the run's steps; 0: none "
                        "during the run, while the export still scores the final weights)")
    t.add_argument("--eval-n", type=int, default=16, help="held-out items per family in those evaluations")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers making batches (default 0)")
    t.add_argument("--dense-weight", type=float,
                   help="weight of the per-visual-token probe loss (the spec's default when omitted; 0: off)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps (the spec's default when omitted)")
    t.add_argument("--attention-weight", type=float,
                   help="weight of the attention supervision (the spec's default when omitted; 0: off)")
    t.add_argument("--curriculum", type=float,
                   help="share of the steps over which background tokens are phased in (spec default; 0: off)")
    t.add_argument("--position-code", type=float,
                   help="amplitude of the 2-D sine-cosine code added to a Llava model's CLIP position embeddings "
                        "at the start (spec default from scratch, 0 for a warm start; 0: none)")
    t.add_argument("--init-lm-from",
                   help="an exported testbed directory whose language model starts this one (e.g. assets/testbed-llava)")
    t.add_argument("--distill-from",
                   help="an exported Llava testbed whose visual tokens the image tokens learn to match "
                        "(e.g. assets/testbed-llava for testbed-qwen2vl)")
    t.add_argument("--distill-weight", type=float, default=1.0, help="weight of that loss (default 1.0)")
    t.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (by default freed memory stays in the process: "
                        "mmtok.testbed.allocator)")
    t.add_argument("--modalities", nargs="+", choices=("image", "video", "audio"),
                   help="train on these media only (default: all of the testbed's)")
    t.add_argument("--position-homotopy", type=float, default=0.0,
                   help="share of the steps over which Qwen2-VL position ids move from 1-D to M-RoPE (default 0: off)")
    t.add_argument("--time-weight", type=float, default=0.0,
                   help="weight of the time read-out: each video token names its temporal patch after the first "
                        "layer (mmtok.testbed.dense_video.time_terms; default 0: off)")
    t.add_argument("--motion-weight", type=float, default=0.0,
                   help="weight of the motion read-out: each video object token names which way its object moves "
                        "within its temporal patch, after the first layer (mmtok.testbed.dense_video.motion_terms; "
                        "default 0: off)")
    t.add_argument("--appearance-weight", type=float, default=0.0,
                   help="weight of the appearance read-out: each video object token names which time its object is "
                        "in view (its k-th flash), after the first layer (mmtok.testbed.dense_video."
                        "appearance_terms; default 0: off)")
    t.add_argument("--appearance-layer", type=int, default=1,
                   help="after which language-model layer the appearance read-out reads (default 1: with the other "
                        "read-outs; 2: the first layer finds where each appearance starts, the second counts them)")
    t.add_argument("--attention-layers", type=_layers, default=None, metavar="L[,L...]",
                   help="language-model layers whose head 0 the attention supervision trains (default: the "
                        "spec's for a run from scratch, else 1, the second; e.g. 1,2 adds the third, where a "
                        "relation's two named objects can be told from their colour-shape swaps)")
    t.add_argument("--relevance-layers", type=_layers, default=None, metavar="L[,L...]",
                   help="after which language-model layers the relevance marks are read (default 1; e.g. 1,2 adds "
                        "marks after the second layer, which can tell a named object from a colour-shape swap)")
    t.add_argument("--position-ramp", action=argparse.BooleanOptionalAction, default=None,
                   help="train the image tokens' top / bottom and left / right read-outs toward each cell's place "
                        "along the axis, not its half (mmtok.testbed.dense.position_ramp; for 'which is further "
                        "left' between two objects in one half; default: the spec's for a run from scratch, "
                        "else off)")
    t.add_argument("--balanced-probe", action="store_true",
                   help="the media tokens' read-outs weigh each class alike (class-balanced mean; for rare "
                        "classes such as chirp tokens) instead of each token")
    t.add_argument("--swap-marks", action="store_true",
                   help="the relevance marks weigh a relation's colour-shape swaps in the clutter (the orange "
                        "diamond when the question names the orange square and the purple diamond) as a class "
                        "of their own, beside the key and the other tokens, in the marks after the later "
                        "--relevance-layers (e.g. 1,2; default: one 'no' token each)")
    t.add_argument("--relation-every-word", action="store_true",
                   help="the attention supervision points both words of a relation answer ('blue triangle') "
                        "at the object that answers, not only the first, so that the second word reads the "
                        "same object's shape (default: the first word only)")
    t.add_argument("--lookalike-marks", action="store_true",
                   help="the relevance marks weigh a position question's look-alikes (the diamonds of the other "
                        "quadrants when it asks about the diamond in the top left one) as a class of their own, "
                        "beside the key and the other tokens (default: one 'no' token each)")
    t.add_argument("--family-mix", metavar="FAMILY=W,...",
                   help="more items of some families: each listed family takes W turns of its modality's turn "
                        "order (e.g. direction=3,flash_count=2; mmtok.testbed.family_mix; 'none': one each; "
                        "default: the spec's for a run from scratch, else one each)")
    t.add_argument("--family-mix-from", metavar="STEP:FAMILY=W,...", action="append", default=None,
                   help="change the family mix from step STEP on, within the run (repeatable, increasing steps; "
                        "e.g. 3300:count=2,position=3,relation=3; STEP:none for one each): the later families "
                        "get their items once the first phase's are learned, without a fresh warm-up")
    t.add_argument("--until", type=int,
                   help="stop after this step (checkpointed) without changing the schedule; --resume continues")
    t.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints (default 50)")
    t.add_argument("--stages", type=int, default=0, metavar="N",
                   help="after the run, the first N warm-started stages of the testbed's stage recipe, each in "
                        "WORK_DIR/stage-K from the run before; only the last exports (testbed-llava: up to 3, "
                        "which brought run B from 83.6 to 90.9 %%; mmtok.testbed.stages; default 0)")
    t.set_defaults(run=run_train)

    e = actions.add_parser("export", help="export the latest checkpoint of a run (finished or not)")
    e.add_argument("name", choices=names)
    e.add_argument("--work-dir", help="where the run's checkpoint.pt is (default /tmp/NAME)")
    e.add_argument("--out", help="export directory (default assets/NAME)")
    e.add_argument("--eval-n", type=int, default=16, help="held-out items per family scored for the card (default 16)")
    e.set_defaults(run=run_export)

    v = actions.add_parser("eval", help="held-out accuracy per family through compress_then_generate (for "
                           "testbed-audio, which no adapter takes yet: identity or random pre-LLM pruning, by "
                           "teacher forcing)")
    v.add_argument("name", help="a testbed name (e.g. testbed-llava) or a model directory")
    v.add_argument("--method", action="append", help="compressor (repeatable; default identity)")
    v.add_argument("--budget", type=_budget, action="append", help="tokens or fraction (repeatable; default 1.0)")
    v.add_argument("--n", type=int, default=16, help="held-out items per family (default 16)")
    v.add_argument("--form", default="mixed", choices=["short", "mc", "mixed"], help="question form")
    v.add_argument("--families", nargs="+", help="only these families")
    v.add_argument("--seed", type=int, default=0, help="held-out dataset seed (default 0)")
    v.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    v.add_argument("--markdown", action="store_true", help="print a markdown table")
    v.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda[:N]")
    v.set_defaults(run=run_eval)

    r = actions.add_parser("report", help="every compressor at every budget on the held-out split: "
                           "docs/quality.md and its plot")
    r.add_argument("name", nargs="?", default="testbed-llava", help="a testbed name (default testbed-llava)")
    r.add_argument("--model-dir", help="load the model from this directory instead of assets/NAME")
    r.add_argument("--n", type=int, default=100, help="held-out items per family (default 100)")
    r.add_argument("--methods", nargs="+", help="compressors (default: every one that takes the model's media)")
    r.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1, 0.05],
                   help="fractions in (0, 1] (default 1.0 0.5 0.25 0.1 0.05)")
    r.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a compressor option, VALUE as JSON (repeatable), e.g. pdrop.layers=[1,2]")
    r.add_argument("--seed", type=int, default=0, help="held-out dataset seed (default 0)")
    r.add_argument("--form", default="mixed", choices=["short", "mc", "mixed"], help="question form")
    r.add_argument("--out", default="docs/quality.md", help="the page; the plot goes beside it as .png")
    r.add_argument("--work", help="cache of finished cells, to resume a stopped run "
                   "(default: mmtok-quality-NAME.jsonl in the temporary directory)")
    r.add_argument("--fresh", action="store_true", help="discard the cache and run every cell")
    r.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    r.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    r.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda[:N]")
    r.set_defaults(run=run_report)


def run_train(args: argparse.Namespace) -> int:
    """Train (and export) one testbed model."""
    from mmtok.testbed.allocator import keep_freed_memory
    from mmtok.testbed.family_mix import parse_mix, parse_switch
    from mmtok.testbed.stages import spec_stages, train_with_stages
    from mmtok.testbed.train import default_out

    if not args.default_malloc and keep_freed_memory():
        print("malloc: freed memory stays in the process (--default-malloc to keep glibc's defaults)", flush=True)
    out = None if args.no_export else (args.out or default_out(args.name))
    stages = spec_stages(args.name, args.stages)
    common = {"threads": args.threads, "device": args.device, "workers": args.workers,
              "eval_every": args.eval_every, "eval_n": args.eval_n, "ckpt_every": args.ckpt_every}
    train_with_stages(
        args.name, stages, work_dir=args.work_dir, out=out, resume=args.resume,
        seed=args.seed, size=args.size, common=common, log=lambda line: print(line, flush=True),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, dense_weight=args.dense_weight,
        curriculum=args.curriculum, init_from=args.init_from, warmup=args.warmup,
        attention_weight=args.attention_weight, position_code=args.position_code, init_lm_from=args.init_lm_from,
        distill_from=args.distill_from, distill_weight=args.distill_weight, modalities=args.modalities,
        position_homotopy=args.position_homotopy, time_weight=args.time_weight,
        motion_weight=args.motion_weight, appearance_weight=args.appearance_weight,
        appearance_layer=args.appearance_layer, attention_layers=args.attention_layers,
        relevance_layers=args.relevance_layers,
        balanced_probe=args.balanced_probe, swap_marks=args.swap_marks, position_ramp=args.position_ramp,
        relation_every_word=args.relation_every_word, lookalike_marks=args.lookalike_marks,
        family_mix=None if args.family_mix is None else parse_mix(args.family_mix),
        family_mix_from=[parse_switch(text) for text in args.family_mix_from or []] or None, until=args.until)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export a run's latest checkpoint."""
    from mmtok.testbed.train import export_checkpoint

    print(f"exported to {export_checkpoint(args.name, args.work_dir, args.out, eval_n=args.eval_n)}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Print the accuracy table of every method x budget."""
    import mmtok
    from mmtok.testbed.evaluate import evaluate, format_reports, heldout

    device = model_device(args.device)
    model, processor = mmtok.load(args.name, dtype="float32")
    model.to(device)
    modalities = _modalities(args.name, model)
    items = heldout(modalities, args.n, args.seed, args.form, args.families)
    if model.config.model_type == "qwen2_audio":
        return _eval_audio(args, model, processor, items)
    reports = [
        evaluate(model, processor, items, method=m, budget=b, batch_size=args.batch_size)
        for m in args.method or ["identity"] for b in args.budget or [1.0]
    ]
    print(format_reports(reports, markdown=args.markdown))
    return 0


def _eval_audio(args: argparse.Namespace, model: object, processor: object, items: list) -> int:
    """``testbed eval`` of a Qwen2-Audio testbed, which no adapter takes yet: random pre-LLM pruning only."""
    from mmtok.testbed.audio_budget import random_budget_accuracy

    methods = args.method or ["identity"]
    if set(methods) - {"identity", "random"}:
        raise ValueError(f"mmtok has no adapter for qwen2_audio yet, so only identity and random (pruning its audio "
                         f"tokens at random before the language model, mmtok.testbed.audio_budget) run on "
                         f"{args.name}, not {sorted(set(methods) - {'identity', 'random'})}")
    budgets = args.budget or [1.0]
    if any(not isinstance(b, float) for b in budgets):
        raise ValueError(f"give the audio budgets as fractions in (0, 1], got {budgets}")
    print("teacher-forced exact match (mmtok.testbed.audio_budget): no adapter for qwen2_audio yet")
    for method in methods:
        for budget in [1.0] if method == "identity" else budgets:
            acc = random_budget_accuracy(model, processor, items, budget, seed=args.seed)
            print(f"{method} @ {budget}: " + "  ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()))
    return 0


def parse_options(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``["pdrop.layers=[1,2]", "fastv.layer=1"]`` -> ``{"pdrop": {"layers": [1, 2]}, "fastv": {"layer": 1}}``.

    Raises:
        ValueError: a pair not of the form ``METHOD.KEY=VALUE``.
    """
    import json

    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        target, eq, text = pair.partition("=")
        method, dot, key = target.partition(".")
        if not (eq and dot and method and key):
            raise ValueError(f"an option is METHOD.KEY=VALUE (e.g. pdrop.layers=[1,2]), got {pair!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(method, {})[key] = tuple(value) if isinstance(value, list) else value
    return out


def model_device(text: str) -> torch.device:
    """``--device``: a ``torch.device`` of type cpu or cuda that this machine has.

    Raises:
        ValueError: not a device name, a type other than cpu / cuda, or a CUDA device this machine lacks.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(available: {torch.cuda.is_available()}); use --device cpu")
    return device


def load_for_report(name: str, model_dir: str | None) -> tuple[object, object]:
    """``mmtok.load`` of ``model_dir``, else of the shipped testbed model (how to make it when missing).

    Raises:
        ValueError: a testbed model that is not in ``assets/`` (the message says how to train or export it).
    """
    import mmtok
    from mmtok.api import ROOT

    if model_dir is not None:
        return mmtok.load(model_dir, dtype="float32")
    if name in SPECS and not (ROOT / "assets" / name).is_dir():
        raise ValueError(
            f"the testbed model {name!r} is not installed ({ROOT / 'assets' / name} does not exist). Train it with "
            f"`mmtok testbed train {name}` (it exports to assets/{name} when done), export a running or stopped "
            f"run's latest checkpoint with `mmtok testbed export {name} --work-dir DIR`, or pass --model-dir DIR"
        )
    return mmtok.load(name, dtype="float32")


def run_report(args: argparse.Namespace) -> int:
    """Run every method x budget and write the quality page and its plot."""
    import re
    import tempfile
    from pathlib import Path

    import torch

    from mmtok.testbed.quality_page import write_quality
    from mmtok.testbed.report import quality_report

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = parse_options(args.option)
    device = model_device(args.device)
    model, processor = load_for_report(args.name, args.model_dir)
    model.to(device)
    label = args.model_dir or args.name
    work = Path(args.work) if args.work else (
        Path(tempfile.gettempdir()) / f"mmtok-quality-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.jsonl")
    if args.fresh:
        work.unlink(missing_ok=True)
    run = quality_report(
        model, processor, methods=args.methods, budgets=args.budgets, n_per_family=args.n, seed=args.seed,
        form=args.form, batch_size=args.batch_size, options=options,
        modalities=_modalities(args.name, model) if args.model_dir is None else None, cache=work,
        model_name=label, progress=lambda line: print(line, flush=True),
    )
    command = " ".join(["mmtok testbed report", args.name, *([f"--model-dir {args.model_dir}"] if args.model_dir else []),
                        f"--n {args.n}", f"--seed {args.seed}", f"--form {args.form}",
                        "--budgets " + " ".join(f"{b:g}" for b in args.budgets),
                        *(["--methods " + " ".join(args.methods)] if args.methods else []),
                        *[f"--option '{o}'" for o in args.option], f"--batch-size {args.batch_size}",
                        *([f"--device {args.device}"] if device.type != "cpu" else []), f"--out {args.out}"])
    md, png = write_quality(run, args.out, command)
    print(f"wrote {md} and {png} (finished cells cached in {work})")
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
