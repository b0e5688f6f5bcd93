"""``mmtok bench compressors``: CPU time of every compressor at N = 576, 2880, 9216 tokens of width 1024."""

from __future__ import annotations

from pathlib import Path

import torch

from mmtok.bench.timing import machine, time_call, write_json
from mmtok.compressors import create_compressor, list_compressors
from mmtok.core import VisualTokens
from mmtok.table import format_table

GRIDS = {576: (24, 24), 2880: (48, 60), 9216: (96, 96)}


def bench_tokens(n: int, dim: int = 1024, text_len: int = 32, seed: int = 0) -> VisualTokens:
    """A batch of one row with every signal, random but seeded, on a grid of ``n`` tokens."""
    if n not in GRIDS:
        raise ValueError(f"bench sizes must be among {sorted(GRIDS)}, got {n}")
    g = torch.Generator().manual_seed(seed)
    return VisualTokens(
        torch.randn(1, n, dim, generator=g),
        grid=GRIDS[n],
        cls_attn=torch.rand(1, n, generator=g).softmax(-1),
        text=torch.randn(1, text_len, dim, generator=g),
        signals={
            "mid_attn": torch.rand(1, n, generator=g).softmax(-1),
            "text_attn": torch.rand(1, n, generator=g).softmax(-1),
            "text_attn_all": torch.rand(1, n, text_len, generator=g).softmax(1),
        },
    )


def run(
    sizes: tuple[int, ...] = (576, 2880, 9216),
    methods: list[str] | None = None,
    budget: float = 0.1,
    dim: int = 1024,
    repeats: int = 3,
    budget_s: float = 60.0,
    out_path: Path | None = None,
) -> dict:
    """Time each compressor at each size; returns (and optionally writes) the results.

    Returns:
        ``{"machine": ..., "budget": ..., "dim": ..., "results": [{"method", "n", "k", "ms", "runs"}]}``.
    """
    names = methods or list_compressors(modality="image")
    results = []
    for n in sizes:
        tokens = bench_tokens(n, dim)
        for name in names:
            comp = create_compressor(name)
            t = time_call(
                lambda comp=comp, tokens=tokens: comp(tokens, budget), repeats=repeats, budget_s=budget_s
            )
            results.append({"method": name, "n": n, "k": max(1, int(budget * n + 0.5)), **t})
    out = {"bench": "compressors", "machine": machine(), "budget": budget, "dim": dim, "results": results}
    if out_path is not None:
        write_json(out, out_path)
    return out


def to_markdown(res: dict) -> str:
    """Table: one row per method, one column per N: time in ms and, in brackets, x the identity baseline."""
    sizes = sorted({r["n"] for r in res["results"]})
    ms = {(r["method"], r["n"]): r["ms"] for r in res["results"]}
    names = list(dict.fromkeys(r["method"] for r in res["results"]))
    rows = []
    for name in names:
        cells = []
        for n in sizes:
            v = ms.get((name, n))
            base = ms.get(("identity", n))
            ratio = f" ({v / base:,.0f}x)" if v is not None and base and name != "identity" else ""
            cells.append("-" if v is None else f"{v:,.2f}{ratio}")
        rows.append([name, *cells])
    header = ["method", *[f"N={n} (ms)" for n in sizes]]
    return format_table(header, rows, markdown=True)
