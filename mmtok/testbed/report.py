"""The quality table: every compressor at every budget on the held-out split, as markdown and a plot.

:func:`quality_report` runs :func:`mmtok.testbed.evaluate.evaluate` (the same ``compress_then_generate``
path as every other consumer) for each method x budget, with ``identity`` at 100 % as the reference
("full") accuracy, and records the visual tokens the language model kept per item. :func:`mmtok.testbed.quality_page.write_quality`
writes the page (``docs/quality.md``) and its plot (accuracy against kept tokens, ``docs/quality.png``)
atomically: a failed run leaves the previous page untouched. Finished cells are appended to a JSON-lines
cache as they complete, so a crashed or interrupted run continues where it stopped.

Example::

    run = quality_report(*mmtok.load("testbed-llava", dtype="float32"), cache="/tmp/quality.jsonl")
    write_quality(run, "docs/quality.md", command="mmtok testbed report")  # mmtok.testbed.quality_page
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtok.testbed.evaluate import FamilyScore, Report, evaluate, heldout

DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
REFERENCE = "identity"
MAX_STAGES = 3  # the in-LLM papers (PyramidDrop, SparseVLM) use three drop layers


@dataclass
class QualityRun:
    """Every cell of a quality run and what the page needs to describe it.

    Attributes:
        model: the model's name (as loaded) for the page.
        architecture: the model's class name.
        reference: ``identity`` at 100 %: the full accuracy.
        reports: ``{(method, budget): Report}`` for every method and budget run (the reference included).
        methods: the methods in page order (``identity`` first).
        budgets: the budgets, largest first.
        stages: the stage each method ran at (its default one).
        options: per method, the compressor options used (empty for the defaults).
        notes: per method, why its options differ from the defaults or why it was left out.
        skipped: methods that cannot run on this model (e.g. in-LLM methods on a one-layer LM).
        n_per_family: held-out items per family; ``seed`` and ``form`` of the held-out set.
    """

    model: str
    architecture: str
    reference: Report
    reports: dict[tuple[str, float], Report]
    methods: list[str]
    budgets: tuple[float, ...]
    stages: dict[str, str]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    n_per_family: int = 0
    seed: int = 0
    form: str = "mixed"

    def cell(self, method: str, budget: float) -> Report | None:
        """The report of ``method`` at ``budget`` (identity's reference at any budget), or None."""
        if method == REFERENCE:
            return self.reference
        return self.reports.get((method, budget))


# ---------------------------------------------------------------------- which methods, with which options


def model_modalities(model: Any) -> tuple[str, ...]:
    """The media a model takes, read from its config's placeholder token ids.

    Raises:
        ValueError: a config with none of ``image_token_id``, ``video_token_id``, ``audio_token_id``.
    """
    config = getattr(model, "config", None)
    found = tuple(m for m, key in (("image", "image_token_id"), ("video", "video_token_id"),
                                   ("audio", "audio_token_id")) if getattr(config, key, None) is not None)
    if not found:
        raise ValueError("cannot tell which media the model takes (its config has no image/video/audio token id)")
    return found


def applicable_methods(modalities: Sequence[str]) -> list[str]:
    """Registered compressors that accept every one of ``modalities``, sorted by name."""
    from mmtok.compressors import compressor_class, list_compressors

    return [n for n in list_compressors() if all(m in compressor_class(n).modalities for m in modalities)]


def decoder_depth(model: Any) -> int:
    """Decoder layers of the model's language model."""
    from mmtok.api import language_model

    return len(language_model(model).layers)


def _fits(compressor: Any, depth: int) -> bool:
    try:
        compressor.llm_schedule(64, 8, depth)
    except ValueError:
        return False
    return True


def fit_options(name: str, depth: int, given: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Options under which ``name`` runs on a language model of ``depth`` layers, or None when none do.

    Only in-LLM methods depend on the depth: their default drop layers (FastV's ``K = 2``, PyramidDrop's and
    SparseVLM's fractions of 32 layers) need a deep enough model. When the defaults do not fit, this takes
    the most drop layers (at most three) that fit, earliest first, or FastV's deepest ``K`` that fits.
    ``given`` options are used as they are.

    Raises:
        ValueError: an unknown method or option.
    """
    from mmtok.compressors import compressor_class, create_compressor

    cls = compressor_class(name)
    base = dict(given or {})
    comp = create_compressor(name, **base)
    if cls.stage != "llm" or not hasattr(comp, "llm_schedule") or _fits(comp, depth):
        return base
    if given:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    candidates: list[dict[str, Any]] = []
    if "layers" in defaults:
        candidates += [{"layers": c} for s in range(MAX_STAGES, 0, -1) for c in itertools.combinations(range(depth), s)]
    if isinstance(defaults.get("layer"), int):
        candidates += [{"layer": k} for k in range(min(defaults["layer"], depth), 0, -1)]
    for opts in candidates:
        try:
            if _fits(create_compressor(name, **opts), depth):
                return opts
        except ValueError:
            continue
    return None


def check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """Distinct fractions in (0, 1], largest first.

    Raises:
        ValueError: an empty list, a non-number or a value outside (0, 1].
    """
    if not budgets:
        raise ValueError(f"budgets must list at least one fraction in (0, 1], e.g. {list(DEFAULT_BUDGETS)}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
            raise ValueError(f"each budget must be a fraction in (0, 1] of an item's visual tokens "
                             f"(e.g. {list(DEFAULT_BUDGETS)}), got {b!r}")
    return tuple(sorted({float(b) for b in budgets}, reverse=True))


# ---------------------------------------------------------------------- the run, with its cache


def model_fingerprint(model: Any) -> str:
    """A hash of the config and of every parameter's first values and sum (changes when weights change)."""
    import torch

    h = hashlib.sha256(str(getattr(model, "config", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            h.update(name.encode())
            h.update(flat[:4096].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:16]


def items_fingerprint(items: Sequence[Any]) -> str:
    """A hash of the items' families, prompts, answers and scenes (the media follow from the scene)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.family, it.prompt, it.answer, it.scene], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def report_to_dict(report: Report) -> dict[str, Any]:
    """A JSON-able :class:`Report`."""
    return dataclasses.asdict(report)


def report_from_dict(data: dict[str, Any]) -> Report:
    """The inverse of :func:`report_to_dict`."""
    return Report(**{**data, "scores": [FamilyScore(**s) for s in data["scores"]]})


def _cell_id(method: str, budget: float, options: dict[str, Any]) -> str:
    return json.dumps([method, float(budget), options], sort_keys=True, default=list)


def _read_cache(path: Path, key: str) -> dict[str, Report]:
    done: dict[str, Report] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the cell is simply run again
        if isinstance(rec, dict) and rec.get("key") == key:
            done[rec["cell"]] = report_from_dict(rec["report"])
    return done


def _append_cache(path: Path, key: str, cell: str, report: Report) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:
        cut = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        line = json.dumps({"key": key, "cell": cell, "report": report_to_dict(report)}) + "\n"
        f.write((("\n" if cut else "") + line).encode())  # never extend a line a crash cut short
        f.flush()
        os.fsync(f.fileno())


def quality_report(
    model: Any,
    processor: Any,
    *,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    n_per_family: int = 100,
    seed: int = 0,
    form: str = "mixed",
    batch_size: int = 16,
    options: dict[str, dict[str, Any]] | None = None,
    modalities: Sequence[str] | None = None,
    cache: str | Path | None = None,
    model_name: str = "",
    progress: Callable[[str], None] | None = None,
) -> QualityRun:
    """Held-out accuracy of every method at every budget, beside ``identity`` at 100 % (full accuracy).

    Args:
        model: a loaded testbed model (``mmtok.load("testbed-llava")``).
        processor: its processor.
        methods: compressors to run; None for every registered one that takes the model's media and can
            run on it (in-LLM methods need at least two decoder layers). ``identity`` is always run once,
            at 100 %, as the reference.
        budgets: fractions in (0, 1] of each item's visual tokens.
        n_per_family: held-out items per family.
        seed: held-out dataset seed.
        form: question form (``"short"``, ``"mc"`` or ``"mixed"``).
        batch_size: prompts per ``generate()`` call.
        options: per method, compressor options (e.g. ``{"pdrop": {"layers": (1, 2)}}``); without them an
            in-LLM method whose default layers do not fit the model uses :func:`fit_options`.
        modalities: the model's media; read from its config when None.
        cache: a JSON-lines file of finished cells; cells found there (same model weights, items, batch
            size and options) are not run again, and each new cell is appended when it finishes.
        model_name: the name shown on the page.
        progress: called with a line per batch and per finished cell.

    Returns:
        The :class:`QualityRun`.

    Raises:
        ValueError: an unknown method or one that cannot take the model's media or run on it, a budget
            outside (0, 1], ``n_per_family`` < 1 or ``batch_size`` < 1.
    """
    from mmtok.compressors import compressor_class, create_compressor

    if isinstance(n_per_family, bool) or not isinstance(n_per_family, int) or n_per_family < 1:
        raise ValueError(f"n_per_family must be an int >= 1 (held-out items per family), got {n_per_family!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    budgets = check_budgets(budgets)
    modalities = tuple(modalities) if modalities is not None else model_modalities(model)
    usable = applicable_methods(modalities)
    options = dict(options or {})
    explicit = methods is not None
    names = list(dict.fromkeys(methods)) if explicit else list(usable)
    for n in names:
        compressor_class(n)
        if n not in usable:
            raise ValueError(f"compressor {n!r} does not take {'/'.join(modalities)}; methods for this model: "
                             f"{', '.join(usable)}")
    for n in options:
        if n not in names and n != REFERENCE:
            raise ValueError(f"options given for {n!r}, which is not among the methods run ({', '.join(names)})")
    depth = decoder_depth(model)
    run_names, used, notes, skipped = [], {}, {}, []
    for n in [m for m in names if m != REFERENCE]:
        opts = fit_options(n, depth, options.get(n))
        if opts is None:
            why = (f"{n}: cannot run on this {depth}-layer language model"
                   + (f" with options {options[n]}" if n in options else " (its drop layers need a deeper one)"))
            if explicit:
                raise ValueError(why)
            skipped.append(n)
            notes[n] = why
            continue
        if opts:
            why = ("as given" if n in options else
                   f"the default layers need a deeper model than this {depth}-layer language model")
            notes[n] = f"{n}: {', '.join(f'{k}={v}' for k, v in opts.items())} ({why})"
        run_names.append(n)
        used[n] = opts

    items = heldout(modalities, n_per_family, seed, form)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), items_fingerprint(items), batch_size]).encode())
    key_s = key.hexdigest()[:24]
    cache_path = Path(cache) if cache is not None else None
    done = _read_cache(cache_path, key_s) if cache_path is not None else {}
    cells = [(REFERENCE, 1.0, {})] + [(n, b, used[n]) for n in run_names for b in budgets]
    reports: dict[tuple[str, float], Report] = {}
    for i, (name, budget, opts) in enumerate(cells, 1):
        cid = _cell_id(name, budget, opts)
        if cid in done:
            report, how = done[cid], "cached"
        else:
            method = create_compressor(name, **opts) if opts else name
            report = evaluate(model, processor, items, method=method, budget=budget, batch_size=batch_size,
                              progress=progress)
            report.method = name
            if cache_path is not None:
                _append_cache(cache_path, key_s, cid, report)
            how = f"{report.seconds:.1f} s"
        reports[(name, budget)] = report
        if progress is not None:
            progress(f"[{i}/{len(cells)}] {name} @ {budget:g}: {100 * report.mean:.1f} % "
                     f"({report.mean_kept:.1f} visual tokens kept, {how})")
    return QualityRun(
        model=model_name or type(model).__name__, architecture=type(model).__name__,
        reference=reports[(REFERENCE, 1.0)], reports=reports, methods=[REFERENCE, *run_names], budgets=budgets,
        stages={n: compressor_class(n).stage for n in [REFERENCE, *run_names]}, options=used, notes=notes,
        skipped=skipped, n_per_family=n_per_family, seed=seed, form=form,
    )
