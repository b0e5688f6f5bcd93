"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, budget_s: float = 60.0) -> dict:
    """Median wall time of ``fn`` in ms over ``repeats`` runs after ``warmup`` runs.

    Stops repeating once ``budget_s`` seconds have been spent (at least one timed run is made), so one
    slow method cannot stall a whole sweep; ``runs`` says how many runs the median is over.
    """
    cuda = torch.cuda.is_available()
    spent = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        spent += time.perf_counter() - t0
        if spent > budget_s:
            break
    times = []
    while len(times) < max(1, repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > budget_s:
            break
    return {"ms": statistics.median(times) * 1e3, "runs": len(times)}


def machine() -> dict:
    """Where the numbers were taken."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
