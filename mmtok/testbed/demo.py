"""The demo's main job: a testbed model answers held-out questions with full and with compressed visual tokens.

:func:`run_demo` loads a testbed model (``testbed-llava`` by default), takes ``n`` held-out items of each
image family, and answers them once per method through :func:`mmtok.compress_then_generate` (one batched
call per method): ``identity`` (every visual token) and a few representative compressors at one budget.
:func:`qa_table` lays the answers out beside the true ones, with per-method accuracy, the visual tokens the
language model kept and the prefill time relative to ``identity``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mmtok.api import ROOT
from mmtok.core.budget import BudgetLike
from mmtok.table import format_table
from mmtok.testbed.data.items import QAItem

DEFAULT_MODEL = "testbed-llava"
# One per family of approach: a floor (random), diversity (DivPrune), vision-tower CLS attention plus merging
# (VisionZip), and pruning inside the language model by its own attention (FastV).
DEMO_METHODS = ("random", "divprune", "visionzip", "fastv")
ASSETS = ROOT / "assets"
MAX_NEW_TOKENS = 10  # the longest testbed answer is 4 words
QUESTION_WIDTH = 44
ANSWER_WIDTH = 16


def missing_message(name: str) -> str:
    """What to run to get the testbed model ``name`` when ``assets/<name>`` is not there."""
    return (
        f"The testbed model {name!r} is not installed ({ASSETS / name} does not exist), so the question-answering "
        f"part of the demo is skipped. Train it with `mmtok testbed train {name}` (it exports to assets/{name} "
        f"when done), or export a running or stopped run's latest checkpoint with `mmtok testbed export {name} "
        "--work-dir DIR`; `mmtok demo --model DIR` takes any exported model directory."
    )


def is_missing_testbed(name: str) -> bool:
    """True for a ``testbed-*`` name whose directory under ``assets/`` does not exist."""
    return name.startswith("testbed-") and not (ASSETS / name).is_dir()


def check_budget(budget: object) -> BudgetLike:
    """A demo budget: a fraction in ``(0, 1]`` of each image's tokens, or a token count >= 1.

    Raises:
        ValueError: anything else (0, a negative number, a fraction above 1, a non-number).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"--budget must be a number, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"--budget as a fraction must be in (0, 1] (e.g. 0.1 = 10 % of each image's tokens), "
                         f"got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"--budget as a token count must be >= 1 (e.g. 26), got {budget}")
    return budget


@dataclass
class MethodRun:
    """One method's answers to the demo items.

    Attributes:
        method: the compressor name; ``stage`` where it ran.
        budget: the budget it ran at (1.0 for ``identity``).
        texts: the generated answer of each item, whitespace normalised.
        right: whether each answer equals the item's answer exactly.
        before: visual tokens of each item's image; ``after``: those the language model kept.
        prefill: seconds from ``generate()`` to the first token, for the whole batch.
    """

    method: str
    stage: str
    budget: BudgetLike
    texts: list[str]
    right: list[bool]
    before: list[int]
    after: list[int]
    prefill: float


def run_method(model: Any, processor: Any, items: Sequence[QAItem], method: str, budget: BudgetLike) -> MethodRun:
    """Answer every item with ``method`` at ``budget`` in one batched ``compress_then_generate`` call."""
    from mmtok.api import compress_then_generate
    from mmtok.testbed.evaluate import normalise

    result = compress_then_generate(
        model, processor, prompt=[it.prompt for it in items], images=[[it.media] for it in items],
        method=method, budget=budget, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
    )
    texts = [normalise(t) for t in result.texts]
    counts = result.tokens["image"]
    return MethodRun(method, result.stage, budget, texts, [t == it.answer for t, it in zip(texts, items, strict=True)],
                     list(counts["before"]), list(counts["after"]), result.timings["prefill"])


def run_methods(model: Any, processor: Any, items: Sequence[QAItem], methods: Sequence[str], budget: BudgetLike,
                note: Callable[[str], None] = print) -> list[MethodRun]:
    """``identity`` first, then each method at ``budget``; a method this model cannot run is skipped with a note.

    A one-token warm-up call on the same batch comes first so that ``identity``'s prefill time, the reference
    of the ratios, does not carry the first call's one-off costs.
    """
    from mmtok.api import compress_then_generate

    compress_then_generate(model, processor, prompt=[it.prompt for it in items], images=[[it.media] for it in items],
                           method="identity", budget=1.0, max_new_tokens=1, do_sample=False)
    runs = [run_method(model, processor, items, "identity", 1.0)]
    for method in methods:
        if method == "identity":
            continue
        try:
            runs.append(run_method(model, processor, items, method, budget))
        except ValueError as err:  # e.g. fastv's layer K on a language model with K layers or fewer
            note(f"{method}: skipped on this model: {err}")
    return runs


def _marks() -> tuple[str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "+", "x"
    return "✓", "✗"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def qa_table(items: Sequence[QAItem], runs: Sequence[MethodRun], marks: tuple[str, str] | None = None) -> str:
    """The demo table: one row per item, then accuracy, visual tokens and prefill time per method.

    An item's row holds its family, question, true answer and each method's answer marked right or wrong;
    the summary rows give each method's accuracy, the visual tokens the language model kept per image (of
    those before) and its prefill time relative to ``identity`` (the first run).
    """
    good, bad = marks or _marks()
    head = ["family", "question", "answer"]
    head += [r.method if r.method == "identity" else f"{r.method} @ {r.budget} ({r.stage})" for r in runs]
    body: list[list[object]] = []
    for i, it in enumerate(items):
        cells = [f"{_clip(r.texts[i] or '(empty)', ANSWER_WIDTH)} {good if r.right[i] else bad}" for r in runs]
        body.append([it.family, _clip(it.question, QUESTION_WIDTH), it.answer, *cells])
    ref = runs[0].prefill
    n = len(items)
    body.append(["accuracy", "", "", *[f"{sum(r.right)}/{n} ({100 * sum(r.right) / n:.0f} %)" for r in runs]])
    body.append(["visual tokens", "kept / before, per image", "",
                 *[f"{sum(r.after) / n:g}/{sum(r.before) / n:g}" for r in runs]])
    body.append(["prefill time", "vs identity", "", *[f"{r.prefill / ref:.2f}x" if ref > 0 else "-" for r in runs]])
    return format_table(head, body)


def run_demo(name: str, methods: Sequence[str], budget: BudgetLike, n: int, out: Callable[[str], None] = print) -> bool:
    """Load ``name`` (float32, CPU), answer ``n`` held-out items per image family with each method, print the table.

    Args:
        name: ``"testbed-llava"`` (or another testbed name), or an exported model directory.
        methods: compressors to compare with ``identity``.
        budget: their budget per image (a fraction or a token count).
        n: held-out items per family.
        out: where lines go.

    Returns:
        False (after printing how to get it) when ``name`` is a testbed model that is not installed, else True.

    Raises:
        ValueError: a model directory that ``mmtok.load`` rejects, or an unknown method.
    """
    import mmtok
    from mmtok.compressors import compressor_class
    from mmtok.testbed.evaluate import heldout

    for m in methods:
        compressor_class(m)
    if is_missing_testbed(name):
        out(missing_message(name))
        return False
    model, processor = mmtok.load(name, dtype="float32")
    items = heldout(["image"], n)
    runs = run_methods(model, processor, items, methods, budget, note=out)
    out(f"{name}: {len(items)} held-out questions ({n} per image family), answered with every visual token "
        f"(identity) and with {len(runs) - 1} compressors at budget {budget} per image")
    out(qa_table(items, runs))
    llm = [r.method for r in runs if r.stage == "llm"]
    if llm:
        out(f"{', '.join(llm)} (llm stage): the first layers of the language model see every visual token; "
            "'kept' counts those left after the method's drop layer.")
    return True
