"""``mmtok bench kernels``: the Triton kernels against their torch references, in ms and GB/s.

Each kernel is timed at each token count ``N`` and width ``C`` on one batch row, in the way the
compressors call it:

- ``merge_tokens``: ``N`` tokens merged into ``K = N // 4`` groups (random assignment, unit weights).
- ``best_match``: ToMe-style bipartite matching, ``N / 2`` rows of ``a`` against ``N / 2`` rows of ``b``.
- ``kcenter``: DivPrune's greedy selection of ``K = N // 10`` rows from a given first row (the
  ``first=None`` search is a ``best_match``-sized cost of its own and is left out).

Achieved bandwidth is ``bytes / time``, where ``bytes`` is the least the algorithm must move through
memory (inputs read once, outputs written once; intermediates that could stay on chip are not
counted), per kernel (``es`` = element size of the features):

- ``merge_tokens``: ``N*C*es`` (x) + ``N*8`` (assign) + ``N*4`` (weights) + ``K*C*es`` (means)
  + ``K*4`` (sizes).
- ``best_match``: ``2*(N/2)*C*es`` (a and b) + ``(N/2)*12`` (index and score). The kernel is
  compute-bound (``2*(N/2)^2*C`` flops), so ``tflops`` is reported too.
- ``kcenter``: ``(K-1)*N*C*es``: each greedy step after the first centre reads every row once to
  update the min-distance vector.

On a machine without CUDA only the torch references are timed; Triton would run in its CPU
interpreter, whose time says nothing about the kernel, so those rows read "not measured (no GPU)".
The default sizes are for a GPU: on a CPU pass small ``sizes`` (the reference at ``N = 36864``
takes minutes there).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import torch

from mmtok.bench.timing import machine, time_call, write_json
from mmtok.kernels import dispatch
from mmtok.table import format_table

KERNELS = ("merge_tokens", "best_match", "kcenter")
NO_GPU = "not measured (no GPU)"
NO_TRITON = "not measured (triton does not import)"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name where the OS says it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _case(
    kernel: str, n: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[tuple, dict]:
    """Arguments of one call of ``kernel`` and what it moves: ``(args, {"k", "bytes"[, "flops"]})``."""
    g = torch.Generator(device=device).manual_seed(seed)
    es = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(1, n, dim, device=device, dtype=dtype, generator=g)
    if kernel == "merge_tokens":
        k = max(1, n // 4)
        assign = torch.randint(0, k, (1, n), device=device, generator=g)
        weights = torch.ones(1, n, device=device)
        return (x, assign, weights, k), {"k": k, "bytes": n * dim * es + n * 12 + k * dim * es + k * 4}
    if kernel == "best_match":
        half = n // 2
        a, b = x[:, :half].contiguous(), x[:, half : 2 * half].contiguous()
        meta = {"k": half, "bytes": 2 * half * dim * es + half * 12, "flops": 2 * half * half * dim}
        return (a, b, None), meta
    if kernel == "kcenter":
        k = max(1, n // 10)
        first = torch.zeros(1, dtype=torch.long, device=device)
        return (x, k, first), {"k": k, "bytes": (k - 1) * n * dim * es}
    raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")


def _row(kernel: str, impl: str, n: int, dim: int, meta: dict, timing: dict | None, status: str) -> dict:
    row = {"kernel": kernel, "impl": impl, "n": n, "dim": dim, "k": meta["k"], "bytes": meta["bytes"]}
    row.update(ms=None, runs=0, gbps=None, status=status)
    if timing is not None:
        sec = timing["ms"] / 1e3
        row.update(ms=timing["ms"], runs=timing["runs"], gbps=meta["bytes"] / sec / 1e9 if sec > 0 else None)
        if "flops" in meta and sec > 0:
            row["tflops"] = meta["flops"] / sec / 1e12
    return row


def run(
    sizes: tuple[int, ...] = (576, 2880, 9216, 36864),
    dims: tuple[int, ...] = (1024, 3584),
    device: str | torch.device | None = None,
    repeats: int = 3,
    out_path: Path | None = None,
    dtype: torch.dtype | None = None,
    kernels: tuple[str, ...] = KERNELS,
    budget_s: float = 60.0,
) -> dict:
    """Time every kernel, torch reference and Triton, at each ``N`` in ``sizes`` and ``C`` in ``dims``.

    Args:
        sizes: token counts ``N``.
        dims: feature widths ``C``.
        device: where to run; CUDA when available, else the CPU.
        repeats: timed runs per case (the median is reported), after one warm-up run (which also
            compiles the Triton kernel).
        out_path: where to write the JSON (atomically); nothing is written when None.
        dtype: feature dtype; bfloat16 on CUDA, float32 on a CPU when None.
        kernels: which of ``KERNELS`` to time.
        budget_s: stop repeating one case after this many seconds.

    Returns:
        ``{"bench": "kernels", "machine", "device", "device_type", "dtype", "bytes_counted",
        "results": [{"kernel", "impl", "n", "dim", "k", "bytes", "ms", "runs", "gbps", "status"
        [, "tflops"]}]}``; ``ms`` and ``gbps`` are None where ``status`` says "not measured".

    Raises:
        ValueError: for an unknown kernel, a size below 2 or a width below 1.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {list(KERNELS)}")
    if any(n < 2 for n in sizes) or any(c < 1 for c in dims):
        raise ValueError(f"sizes must be >= 2 and dims >= 1, got sizes={sizes} dims={dims}")
    if dev.type != "cuda":
        triton_status = NO_GPU
    else:
        triton_status = "measured" if dispatch.triton_available() else NO_TRITON
    results = []
    for n in sizes:
        for dim in dims:
            for kernel in kernels:
                args, meta = _case(kernel, n, dim, dev, dt)
                for impl in ("torch", "triton"):
                    status = "measured" if impl == "torch" else triton_status
                    timing = None
                    if status == "measured":
                        fn: Callable = getattr(dispatch, kernel)
                        timing = time_call(
                            lambda fn=fn, args=args, impl=impl: fn(*args, impl=impl),
                            repeats=repeats,
                            budget_s=budget_s,
                        )
                    results.append(_row(kernel, impl, n, dim, meta, timing, status))
                del args
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    out = {
        "bench": "kernels",
        "machine": machine(),
        "device": device_name(dev),
        "device_type": dev.type,
        "dtype": str(dt).removeprefix("torch."),
        "bytes_counted": {
            "merge_tokens": "N*C*es + 12*N + K*C*es + 4*K, K = N//4",
            "best_match": "2*(N/2)*C*es + 12*(N/2)",
            "kcenter": "(K-1)*N*C*es, K = N//10",
        },
        "results": results,
    }
    if out_path is not None:
        write_json(out, Path(out_path))
    return out


def to_markdown(res: dict) -> str:
    """A line naming the device, then one table row per kernel, N and C: torch vs Triton."""
    cells: dict[tuple, dict] = {}
    for r in res["results"]:
        cells.setdefault((r["kernel"], r["n"], r["dim"]), {})[r["impl"]] = r

    def ms(r: dict | None) -> str:
        if r is None:
            return "-"
        return r["status"] if r["ms"] is None else f"{r['ms']:.3f}"

    def gbps(r: dict | None) -> str:
        return "-" if r is None or r["gbps"] is None else f"{r['gbps']:.1f}"

    rows = []
    for (kernel, n, dim), pair in cells.items():
        t, tr = pair.get("torch"), pair.get("triton")
        speedup = "-"
        if t and tr and t["ms"] and tr["ms"]:
            speedup = f"{t['ms'] / tr['ms']:.2f}x"
        rows.append([kernel, n, dim, ms(t), gbps(t), ms(tr), gbps(tr), speedup])
    header = ["kernel", "N", "C", "torch ms", "torch GB/s", "triton ms", "triton GB/s", "speedup"]
    title = f"device: {res['device']} ({res['device_type']}, {res['dtype']})"
    return title + "\n\n" + format_table(header, rows, markdown=True)
