"""``mmtok compressors``: list the registered compressors with their paper, stage and signals."""

from __future__ import annotations

import argparse
import json

from mmtok.compressors import compressor_class, list_compressors
from mmtok.table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtok compressors``."""
    p = sub.add_parser("compressors", help="list the registered compressors")
    p.add_argument("--stage", choices=["vision", "pre_llm", "llm"], help="only those usable at this stage")
    p.add_argument("--modality", choices=["image", "video", "audio"], help="only those for this modality")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (as in the README)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of compressors."""
    rows = [compressor_class(n).describe() for n in list_compressors(args.stage, args.modality)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    body = [
        [r["name"], r["paper"], ", ".join(r["stages"]), ", ".join(r["requires"]) or "-", _kind(r)]
        for r in rows
    ]
    print(format_table(["name", "paper", "stages", "signals", "output"], body, markdown=args.markdown))
    return 0


def _kind(row: dict) -> str:
    if row["name"] == "identity":
        return "all tokens"
    return "at most the budget" if row["adaptive"] else "exactly the budget"
