"""The quality table's page: markdown tables of a :class:`~mmtok.testbed.report.QualityRun` and its plot.

:func:`format_quality` writes accuracy and % of full accuracy per method and budget, per family at 10 %, and
issue #4's check (``random`` at 10 % must lose >= 15 points on at least half the families);
:func:`plot_quality` plots accuracy against visual tokens kept; :func:`write_quality` writes both atomically,
so a failed run leaves the previous page untouched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from mmtok.testbed.report import REFERENCE, QualityRun

CHECK_METHOD, CHECK_BUDGET, CHECK_POINTS = "random", 0.1, 15.0  # issue #4: random @ 10 % must lose >= 15 points


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
