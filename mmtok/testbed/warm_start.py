"""Where a warm-started stage takes its weights and lineage from: a run's checkpoint or a shipped export.

A run's ``checkpoint.pt`` holds the weights, settings, step and history. A shipped directory
(``assets/<name>``) holds fp16 weights and, since the exports record it, ``training.json``: the settings,
step and the part of the history a later stage's lineage needs. Either can start the next stage, so a stage
can continue from the shipped weights on a machine that never saw the run's work directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

TRAINING_RECORD = "training.json"


def training_record(step: int, settings: dict[str, Any], history: dict[str, Any]) -> dict[str, Any]:
    """What an export keeps of its run for a later warm start: step, settings, minutes and hardware."""
    return {"step": step, "settings": settings,
            "history": {"seconds": history["seconds"], "hardware": history.get("hardware", "not recorded")}}


def load_warm_start(source: str | Path) -> tuple[dict[str, Any], Path]:
    """The state a warm start reads: ``{"model": state dict, "settings", "step", "history"}``.

    Args:
        source: a ``checkpoint.pt``, a run's work directory holding one, or an exported model directory
            holding ``model.safetensors`` and ``training.json``.

    Returns:
        The state (fp32 weights) and the file it came from.

    Raises:
        FileNotFoundError: ``source`` is none of those.
    """
    path = Path(source)
    if path.is_dir() and not (path / "checkpoint.pt").is_file() and (path / TRAINING_RECORD).is_file():
        record = json.loads((path / TRAINING_RECORD).read_text())
        config = transformers.AutoConfig.from_pretrained(path)
        model_class = getattr(transformers, config.architectures[0])
        model = model_class.from_pretrained(path, dtype=torch.float32)
        return {"model": model.state_dict(), **record}, path / TRAINING_RECORD
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to warm-start from at {source}: give a checkpoint.pt, a run's "
                                f"work directory, or an exported model directory with {TRAINING_RECORD}")
    return torch.load(path, weights_only=False, map_location="cpu"), path
