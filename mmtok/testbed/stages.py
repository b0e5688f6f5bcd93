"""A training run followed by warm-started stages, as one resumable command (``mmtok testbed train --stages``).

A testbed's recipe can be longer than one schedule: ``testbed-llava``'s from-scratch run levels off with
position and relation questions near chance, and short warm-started stages at a lower rate with more of
those items bring it past 90 % (docs/testbed.md, Status). Each stage is an ordinary :func:`train` run whose
``init_from`` is the previous run's work directory (fresh optimiser and schedule; the data continue after
the items the previous runs consumed; the lineage goes into the export's ``training.json`` and card), so
running them here is exactly running the commands one after another, with the directories named for you:
the first run in ``work_dir``, stage ``k`` in ``work_dir/stage-k``. Only the last run exports. With
``resume`` every run continues from its own checkpoint, so a stopped chain picks up where it was (a
finished run is loaded and left as it is).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mmtok.testbed.train as training
from mmtok.testbed.models import get_spec

# train() arguments that a stage takes from the chain, not from its recipe entry.
CHAIN_KEYS = frozenset({"work_dir", "out", "resume", "init_from", "seed", "size", "until", "log"})


def stage_dir(work_dir: str | Path, k: int) -> Path:
    """Where stage ``k`` (1-based) of a chain rooted at ``work_dir`` keeps its checkpoint."""
    return Path(work_dir) / f"stage-{k}"


def spec_stages(name: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` stages of testbed ``name``'s stage recipe (``TestbedSpec.stage_recipe``).

    Raises:
        ValueError: ``count`` negative or beyond the recipe (which may be empty).
    """
    recipe = get_spec(name).stage_recipe
    if not recipe and count:
        raise ValueError(f"{name} has no stage recipe: stages must be 0, got {count}")
    if not 0 <= count <= len(recipe):
        raise ValueError(f"{name}'s stage recipe has {len(recipe)} stages: stages must be in 0 .. {len(recipe)}, "
                         f"got {count}")
    return [copy.deepcopy(stage) for stage in recipe[:count]]


def train_with_stages(
    name: str,
    stages: Sequence[Mapping[str, Any]],
    *,
    work_dir: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    size: str = "full",
    common: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    **first: Any,
) -> dict[str, Any]:
    """Train ``name`` with ``first``'s arguments, then each of ``stages`` warm-started from the run before.

    Args:
        name: a testbed name.
        stages: one dict of :func:`train` keyword arguments per stage (its recipe: steps, lr, family mix ...).
        work_dir: the first run's directory (``/tmp/<name>`` when None); stage ``k`` runs in
            ``work_dir/stage-k``.
        out: where the last run exports (none when None).
        resume: every run continues from its own checkpoint when it has one.
        seed: weights and data seed of every run.
        size: a size name of the spec.
        common: :func:`train` arguments for every run (threads, device, workers, eval_every, eval_n, ckpt_every).
        log: progress lines.
        **first: the first run's own :func:`train` arguments (its recipe; ``init_from`` for a chain that
            starts warm).

    Returns:
        The last run's :func:`train` result.

    Raises:
        ValueError: a stage entry or ``common`` naming an argument the chain sets (``work_dir``,
            ``init_from``, ``until`` ...), or ``until`` among the first run's arguments while stages follow.
    """
    common = dict(common or {})
    named = [("common", common)] + [(f"stage {i}", stage) for i, stage in enumerate(stages, 1)]
    for where, arguments in named:
        clash = sorted(CHAIN_KEYS & set(arguments))
        if clash:
            raise ValueError(f"{where} names {clash}, which the chain sets for every run: drop them")
    if stages and first.get("until") is not None:
        raise ValueError("until stops one run part-way; with stages, stop the chain and continue it with resume")
    root = Path(work_dir) if work_dir is not None else training.default_work_dir(name)
    runs = [(root, first)] + [(stage_dir(root, k), dict(s)) for k, s in enumerate(stages, 1)]
    result: dict[str, Any] = {}
    for k, (run_dir, recipe) in enumerate(runs):
        if k:
            recipe["init_from"] = runs[k - 1][0]
            log(f"stage {k} of {len(stages)} of {name} in {run_dir}, from {recipe['init_from']}")
        result = training.train(name, work_dir=run_dir, out=out if k == len(stages) else None, resume=resume,
                                seed=seed, size=size, log=log, **common, **recipe)
    return result
