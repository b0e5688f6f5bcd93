"""Choose between the Triton kernels and the torch references, per call."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache

import torch

from mmtok.core import best_match as best_match_torch
from mmtok.core import kcenter as kcenter_torch
from mmtok.core import merge_tokens as merge_tokens_torch

IMPLS = ("torch", "triton")
_TORCH: dict[str, Callable] = {
    "merge_tokens": merge_tokens_torch,
    "best_match": best_match_torch,
    "kcenter": kcenter_torch,
}


# The default on CUDA, per kernel, from `mmtok bench kernels` on an H200 (docs/benchmarks.md, 2026-11-27):
# the Triton merge and k-center beat torch (2-5.7x, 1.3-3.8x) but the exact-fp32 tiled best-match ran at
# 0.05-0.28x of torch's cuBLAS matmul + max, so torch stays the default there until the kernel wins.
CUDA_DEFAULTS = {"merge_tokens": "triton", "kcenter": "triton", "best_match": "torch"}


@cache
def _triton_module(name: str):  # noqa: ANN202
    return importlib.import_module(f"mmtok.kernels.triton_{name}")


@cache
def triton_available() -> bool:
    """Whether triton imports (it needs a GPU driver, or ``TRITON_INTERPRET=1`` on a CPU)."""
    try:
        importlib.import_module("triton")
    except Exception:  # triton raises RuntimeError, ImportError, ... when no driver is active
        return False
    return True


def available_impls() -> list[str]:
    """The implementations usable in this process."""
    return ["torch", "triton"] if triton_available() else ["torch"]


def resolve_impl(device: torch.device, impl: str | None = None, kernel: str | None = None) -> str:
    """Which implementation runs for tensors on ``device``.

    Order: the ``impl`` argument, then ``MMTOK_KERNELS``, then the faster one measured on CUDA
    (:data:`CUDA_DEFAULTS` for ``kernel``; Triton when ``kernel`` is None), if triton imports, and
    torch elsewhere.

    Raises:
        ValueError: for an unknown ``impl`` / ``MMTOK_KERNELS`` value, or ``"triton"`` where triton
            cannot run.
    """
    choice = impl if impl is not None else os.environ.get("MMTOK_KERNELS") or None
    if choice is not None and choice not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {choice!r} (from impl= or MMTOK_KERNELS)")
    if choice is None:
        if device.type != "cuda" or not triton_available():
            return "torch"
        return CUDA_DEFAULTS.get(kernel, "triton") if kernel is not None else "triton"
    if choice == "triton" and not triton_available():
        raise ValueError(
            "impl='triton' asked for, but triton does not import here (no GPU and no TRITON_INTERPRET=1)"
        )
    return choice


def _dispatch(name: str, device: torch.device, impl: str | None) -> Callable:
    if resolve_impl(device, impl, name) == "torch":
        return _TORCH[name]
    return getattr(_triton_module(name), name)


def merge_tokens(
    x: torch.Tensor, assign: torch.Tensor, weights: torch.Tensor, num_groups: int, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching :func:`mmtok.core.merge_tokens`."""
    return _dispatch("merge_tokens", x.device, impl)(x, assign, weights, num_groups)


def best_match(
    a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None = None, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching :func:`mmtok.core.best_match`."""
    return _dispatch("best_match", a.device, impl)(a, b, b_mask)


def kcenter(
    x: torch.Tensor, k: int, first: torch.Tensor | None = None, *, impl: str | None = None
) -> torch.Tensor:
    """Dispatching :func:`mmtok.core.kcenter`."""
    return _dispatch("kcenter", x.device, impl)(x, k, first)
