"""Held-out accuracy of a testbed model per task family, through ``mmtok.compress_then_generate``.

The same path every consumer uses: the model's processor and chat template (media first, then the
question), the compressor's plan at the given budget, and the model's own greedy ``generate()``. An item
is right when the generated text, with whitespace normalised, equals the item's answer exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmtok.testbed.data import HELDOUT_SPLIT, QAItem, chance, families, item

MAX_NEW_TOKENS = 10  # the longest answer is 4 words; the rest is room for a wrong, longer one


@dataclass
class FamilyScore:
    """Accuracy of one family: ``correct`` of ``total`` items, beside the chance level of the forms asked."""

    family: str
    modality: str
    correct: int
    total: int
    chance: float

    @property
    def accuracy(self) -> float:
        """``correct / total`` (0 for an empty family)."""
        return self.correct / self.total if self.total else 0.0


@dataclass
class Report:
    """Per-family scores of one method and budget, the wall time of the run and the visual tokens per item.

    ``visual_before`` / ``visual_after``: per item (in item order), the visual tokens of its media before
    compression and those the language model kept (``Result.tokens[modality]``, summed over modalities; at
    the ``llm`` stage, those left after the method's last drop layer).
    """

    method: str
    budget: Any
    form: str
    scores: list[FamilyScore] = field(default_factory=list)
    seconds: float = 0.0
    visual_before: list[int] = field(default_factory=list)
    visual_after: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Accuracy averaged over families (each family weighs the same)."""
        return sum(s.accuracy for s in self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def mean_kept(self) -> float:
        """Visual tokens the language model kept, averaged over items (0 when none were recorded)."""
        return sum(self.visual_after) / len(self.visual_after) if self.visual_after else 0.0

    def by_family(self) -> dict[str, float]:
        """``{family: accuracy}``."""
        return {s.family: s.accuracy for s in self.scores}


def normalise(text: str) -> str:
    """Collapse whitespace (the word-level tokenizer decodes words joined by single spaces)."""
    return " ".join(text.split())


def heldout(modalities: Sequence[str], n: int, seed: int = 0, form: str = "mixed",
            only: Sequence[str] | None = None) -> list[QAItem]:
    """The first ``n`` held-out items of each family of ``modalities`` (or of the families in ``only``).

    Raises:
        ValueError: ``n`` < 1 or a family in ``only`` that none of the modalities has.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 held-out items per family, got {n}")
    names = [(m, f) for m in modalities for f in families(m)]
    if only is not None:
        known = {f for _, f in names}
        unknown = [f for f in only if f not in known]
        if unknown:
            raise ValueError(f"unknown families {unknown}; expected some of {sorted(known)}")
        names = [(m, f) for m, f in names if f in only]
    return [item(m, HELDOUT_SPLIT, i, seed, family=f, form=form) for m, f in names for i in range(n)]


def _media(items: Sequence[QAItem], modality: str) -> list[Any] | None:
    if all(it.modality != modality for it in items):
        return None
    return [[it.media] if it.modality == modality else [] for it in items]


def evaluate(
    model: Any,
    processor: Any,
    items: Sequence[QAItem],
    *,
    method: str = "identity",
    budget: Any = 1.0,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Report:
    """Answer ``items`` with ``method`` at ``budget`` and score exact matches per family.

    Args:
        model: a loaded testbed model (e.g. from ``mmtok.load("testbed-llava")``).
        processor: its processor.
        items: held-out items (see :func:`heldout`).
        method: a registered compressor name (``"identity"`` keeps every token).
        budget: tokens per item (int), a fraction (float) or an ``mmtok.Budget``.
        batch_size: prompts per ``generate()`` call.
        progress: called with a line after each batch.
        **options: extra ``compress_then_generate`` keywords (e.g. ``stage``).

    Returns:
        The :class:`Report`, families in generator order.

    Raises:
        ValueError: no items, or anything ``compress_then_generate`` rejects (unknown method, budget).
    """
    from mmtok.api import compress_then_generate

    if not items:
        raise ValueError("evaluate needs at least one item")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    right: dict[str, list[bool]] = {}
    before: list[int] = []
    after: list[int] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        result = compress_then_generate(
            model, processor, prompt=[it.prompt for it in chunk], images=_media(chunk, "image"),
            videos=_media(chunk, "video"), audios=_media(chunk, "audio"), method=method, budget=budget,
            max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **options,
        )
        texts = result.text if isinstance(result.text, list) else [result.text]
        media = [counts for key, counts in result.tokens.items() if key != "sequence"]
        before += [sum(c["before"][row] for c in media) for row in range(len(chunk))]
        after += [sum(c["after"][row] for c in media) for row in range(len(chunk))]
        for it, text in zip(chunk, texts, strict=True):
            right.setdefault(it.family, []).append(normalise(text) == it.answer)
        if progress is not None:
            done = start + len(chunk)
            progress(f"{method} @ {budget}: {done}/{len(items)} items, "
                     f"{sum(sum(v) for v in right.values())} right")
    report = Report(method, budget, items[0].form if len({it.form for it in items}) == 1 else "mixed",
                    visual_before=before, visual_after=after)
    seen: dict[str, QAItem] = {}
    for it in items:
        seen.setdefault(it.family, it)
    for fam, first in seen.items():
        forms = [it.form for it in items if it.family == fam]
        ch = sum(chance(fam, f) for f in forms) / len(forms)
        report.scores.append(FamilyScore(fam, first.modality, sum(right[fam]), len(right[fam]), ch))
    report.seconds = time.perf_counter() - t0
    return report


def format_reports(reports: Sequence[Report], markdown: bool = False) -> str:
    """One table: a row per family, a column per report (accuracy %), chance % and the mean row."""
    from mmtok.table import format_table

    if not reports:
        raise ValueError("format_reports needs at least one report")
    head = ["family", "chance %", *[f"{r.method} @ {r.budget}" for r in reports]]
    first = reports[0]
    body = []
    for i, s in enumerate(first.scores):
        body.append([s.family, f"{100 * s.chance:.1f}", *[f"{100 * r.scores[i].accuracy:.1f}" for r in reports]])
    mean_chance = sum(s.chance for s in first.scores) / len(first.scores)
    body.append(["mean", f"{100 * mean_chance:.1f}", *[f"{100 * r.mean:.1f}" for r in reports]])
    return format_table(head, body, markdown=markdown)
