"""Plain-text tables for the command line and markdown reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Align ``rows`` under ``header``; as a GitHub markdown table when ``markdown``."""
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        padded = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append(("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip())
        if j == 0:
            sep = ["-" * w for w in widths]
            lines.append(("| " + " | ".join(sep) + " |") if markdown else "  ".join(sep))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
