"""The quality table: every compressor at every budget on the held-out split, as markdown and a plot.

:func:`quality_report` runs :func:`mmtok.testbed.evaluate.evaluate` (the same ``compress_then_generate``
path as every other consumer) for each method x budget, with ``identity`` at 100 % as the reference
("full") accuracy, and records the visual tokens the language model kept per item. :func:`write_quality`
writes the page (``docs/quality.md``) and its plot (accuracy against kept tokens, ``docs/quality.png``)
atomically: a failed run leaves the previous page untouched. Finished cells are appended to a JSON-lines
cache as they complete, so a crashed or interrupted run continues where it stopped.

Example::

    run = quality_report(*mmtok.load("testbed-llava", dtype="float32"), cache="/tmp/quality.jsonl")
    write_quality(run, "docs/quality.md", command="mmtok testbed report")
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtok.testbed.evaluate import FamilyScore, Report, evaluate, heldout

DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
REFERENCE = "identity"
CHECK_METHOD, CHECK_BUDGET, CHECK_POINTS = "random", 0.1, 15.0  # issue #4: random @ 10 % must lose >= 15 points
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


# ---------------------------------------------------------------------- the page


def pct(budget: float) -> str:
    """``0.25`` -> ``"25 %"``, ``0.05`` -> ``"5 %"``."""
    return f"{100 * budget:g} %"


def of_full(accuracy: float, full: float) -> str:
    """``accuracy`` as a percentage of ``full`` (one decimal), ``"-"`` when full accuracy is 0."""
    return f"{100 * accuracy / full:.1f}" if full > 0 else "-"


def _tokens(value: float) -> str:
    return f"{value:.0f}" if math.isclose(value, round(value), abs_tol=1e-9) else f"{value:.1f}"


def _media_sizes(counts: list[int]) -> str:
    """``"256"`` when every item has that many visual tokens, else ``"256 to 1152 (mean 674.1)"``."""
    if not counts:
        return "0"
    low, high = min(counts), max(counts)
    return _tokens(low) if low == high else f"{_tokens(low)} to {_tokens(high)} (mean {_tokens(sum(counts) / len(counts))})"


def random_check(run: QualityRun) -> tuple[list[str], dict[str, float]] | None:
    """Issue #4's check: families where ``random`` at 10 % is >= 15 points below full accuracy.

    Returns:
        ``(families that lose >= 15 points, {family: points lost})``, or None when random at 10 % was not run.
    """
    rand = run.cell(CHECK_METHOD, CHECK_BUDGET)
    if rand is None:
        return None
    full = run.reference.by_family()
    drops = {f: 100 * (full[f] - a) for f, a in rand.by_family().items()}
    return [f for f, d in drops.items() if d >= CHECK_POINTS - 1e-9], drops


def format_quality(run: QualityRun, command: str = "", plot: str | None = "quality.png") -> str:
    """The markdown page: summary, every cell, the per-family table at 10 % and the random check."""
    from mmtok.table import format_table

    ref = run.reference
    full = ref.mean
    fams = [s.family for s in ref.scores]
    chance = sum(s.chance for s in ref.scores) / len(ref.scores) if ref.scores else 0.0
    visual = _media_sizes(ref.visual_before)
    out = [
        "# Quality: held-out accuracy of every compressor at every budget",
        "",
        "<!-- written by `mmtok testbed report`; edits are overwritten -->",
        "",
        f"Model: `{run.model}` ({run.architecture}, {visual} visual tokens per item). Held-out split, "
        f"{run.n_per_family} items per family x {len(fams)} families = {sum(s.total for s in ref.scores)} "
        f"items (seed {run.seed}, form {run.form}); greedy decoding, an answer counts when it matches exactly. "
        f"Accuracy is the mean over families. **Full accuracy** (`identity`, every token): "
        f"**{100 * full:.1f} %**; chance: {100 * chance:.1f} %.",
        "",
    ]
    if command:
        out += [f"Rerun: `{command}`", ""]
    if plot:
        out += [f"![accuracy against visual tokens kept]({plot})", ""]
    others = [m for m in run.methods if m != REFERENCE]
    out += ["## % of full accuracy", "",
            "Accuracy at each budget as a percentage of full accuracy (best per budget in bold).", ""]
    best = {}
    for b in run.budgets:
        vals = [r.mean for m in others if (r := run.cell(m, b)) is not None]
        best[b] = max(vals) if vals else None
    rows = []
    for m in run.methods:
        row: list[object] = [m, run.stages[m]]
        for b in run.budgets:
            r = run.cell(m, b) if (m != REFERENCE or b == 1.0) else None
            text = "" if r is None else of_full(r.mean, full)
            bold = m != REFERENCE and r is not None and full > 0 and best[b] is not None and r.mean == best[b]
            row.append(f"**{text}**" if bold else text)
        rows.append(row)
    out += [format_table(["method", "stage", *[pct(b) for b in run.budgets]], rows, markdown=True), ""]

    out += ["## Every cell", "",
            "Visual tokens kept: per item, the visual tokens the language model kept (at the `llm` stage, "
            "those left after the method's last drop layer; the layers before it see every token).", ""]
    rows = []
    for m in run.methods:
        for b in ([1.0] if m == REFERENCE else run.budgets):
            r = run.cell(m, b)
            if r is not None:
                rows.append([m, run.stages[m], pct(b), _tokens(r.mean_kept), f"{100 * r.mean:.1f}", of_full(r.mean, full)])
    head = ["method", "stage", "budget", "visual tokens kept", "accuracy %", "% of full"]
    out += [format_table(head, rows, markdown=True), ""]

    out += [f"## Per family at {pct(CHECK_BUDGET)}", ""]
    if CHECK_BUDGET in run.budgets:
        rows = [["chance", *[f"{100 * s.chance:.1f}" for s in ref.scores], f"{100 * chance:.1f}"],
                ["full (identity @ 100 %)", *[f"{100 * s.accuracy:.1f}" for s in ref.scores], f"{100 * full:.1f}"]]
        for m in others:
            r = run.cell(m, CHECK_BUDGET)
            if r is not None:
                acc = r.by_family()
                rows.append([m, *[f"{100 * acc[f]:.1f}" for f in fams], f"{100 * r.mean:.1f}"])
        out += ["Accuracy % per family.", "", format_table(["method", *fams, "mean"], rows, markdown=True), ""]
    else:
        out += [f"Not computed: {pct(CHECK_BUDGET)} is not among the budgets of this run.", ""]

    out += [f"## Check: `{CHECK_METHOD}` at {pct(CHECK_BUDGET)} against full accuracy", ""]
    check = random_check(run)
    if check is None:
        out += [f"Not computed: `{CHECK_METHOD}` at {pct(CHECK_BUDGET)} was not run.", ""]
    else:
        lost, drops = check
        need = math.ceil(len(fams) / 2)
        verdict = "met" if len(lost) >= need else "NOT met"
        out += [f"Issue #4 asks that `{CHECK_METHOD}` at {pct(CHECK_BUDGET)} lose at least {CHECK_POINTS:g} points "
                f"against full accuracy on at least half the families ({need} of {len(fams)}), so that the "
                f"tasks depend on the visual tokens. It loses that much on **{len(lost)} of {len(fams)}** "
                f"families ({', '.join(lost) or 'none'}): **{verdict}**.", ""]
        rows = [[f, f"{100 * run.reference.by_family()[f]:.1f}", f"{100 * run.reference.by_family()[f] - d:.1f}",
                 f"{d:.1f}", "yes" if f in lost else "no"] for f, d in drops.items()]
        out += [format_table(["family", "full %", f"{CHECK_METHOD} @ {pct(CHECK_BUDGET)}: accuracy %", "points lost",
                              f">= {CHECK_POINTS:g}"], rows, markdown=True), ""]
    if run.notes:
        out += ["## Notes", "", *[f"- {run.notes[m]}" for m in sorted(run.notes)], ""]
    return "\n".join(out)


def plot_quality(run: QualityRun, path: str | Path) -> None:
    """Accuracy (%) against visual tokens kept (log scale): one line per method, full and chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from mmtok.core.budget import count_for

    ref = run.reference
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        colours = plt.get_cmap("tab20").colors
        markers = "osD^v<>pPX*h"
        others = [m for m in run.methods if m != REFERENCE]
        for i, m in enumerate(others):
            pts = sorted((r.mean_kept, 100 * r.mean) for b in run.budgets
                         if (r := run.cell(m, b)) is not None and r.mean_kept > 0)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker=markers[i % len(markers)], color=colours[i % len(colours)], label=m,
                        linewidth=1.2, markersize=4)
        ax.axhline(100 * ref.mean, color="black", linestyle="--", linewidth=1, label="full (identity)")
        if ref.scores:
            chance = 100 * sum(s.chance for s in ref.scores) / len(ref.scores)
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log")
        visual = round(sum(ref.visual_before) / len(ref.visual_before)) if ref.visual_before else 0
        if visual > 0:  # ticks at each budget's token count (adaptive methods may sit below theirs)
            ticks = sorted({count_for(b, visual, "the ticks") for b in (*run.budgets, 1.0)})
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("visual tokens kept per item (log scale)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{run.model}: accuracy against visual tokens kept "
                     f"({run.n_per_family} items per family)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write to a temporary file beside ``path``; the caller renames it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_quality(run: QualityRun, out: str | Path, command: str = "") -> tuple[Path, Path]:
    """Write the page and its plot (``<out>`` and ``<out stem>.png`` beside it), both or neither.

    Both are written to temporary files first and renamed into place only once both are complete.

    Returns:
        ``(markdown path, png path)``.
    """
    md = Path(out)
    png = md.with_suffix(".png")
    md.parent.mkdir(parents=True, exist_ok=True)
    text = format_quality(run, command, plot=png.name)
    tmp_png = _atomic(png, lambda p: plot_quality(run, p))
    try:
        tmp_md = _atomic(md, lambda p: p.write_text(text + "\n"))
    except BaseException:
        tmp_png.unlink(missing_ok=True)
        raise
    os.replace(tmp_png, png)
    os.replace(tmp_md, md)
    return md, png
