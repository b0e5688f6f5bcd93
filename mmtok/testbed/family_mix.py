"""More training items of some families: a weighted turn order, with no item drawn twice across stages.

By default a stage's items of one modality take the families in turn (:func:`mmtok.testbed.data.item`:
stream index ``i`` is item ``i // F`` of family ``i % F``), so each of a video batch's 8 items is one of 7
families and a family the model finds hard gets no more practice than one it has learned. A family mix
``{"direction": 3}`` repeats a family in the turn order (here 9 turns: "direction" three times, the other six
once). Each family's items in a mixed stage are numbered on from a floor above every item index an earlier
stage can have used, and :func:`items_after` moves the next stage's data offset past the mixed stage's items,
so a chain of warm-started stages, mixed or not, never sees an item twice (a test checks it).

A mix can also change within one run (``family_mix_from``, e.g. ``[[3300, {"position": 3}]]``: from step
3,300 on, three position items per turn): each phase draws its items as a warm-started stage would, numbered
on past every item of the phases before it (:func:`mix_phases`), while the weights and the learning-rate
schedule carry on. A model can then learn the families it picks up first (reading, counting) before the mix
turns to those it learns late, without the fresh warm-up of another stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from mmtok.testbed.data import families, item
from mmtok.testbed.data.items import QAItem


def check_mix(mix: Mapping[str, int], modalities: Sequence[str]) -> dict[str, int]:
    """``mix`` validated: families of ``modalities``, each with a whole weight >= 1.

    Raises:
        ValueError: an unknown family or a weight that is not a whole number >= 1.
    """
    known = [f for m in modalities for f in families(m)]
    out = {}
    for name, weight in mix.items():
        if name not in known:
            raise ValueError(f"family mix: {name!r} is not a family of {list(modalities)}; families: {known}")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"family mix: the weight of {name!r} must be a whole number >= 1, got {weight!r}")
        out[name] = weight
    return out


def parse_mix(text: str) -> dict[str, int]:
    """``"direction=3,flash_count=2"`` -> ``{"direction": 3, "flash_count": 2}``; ``"none"`` -> ``{}`` (no mix).

    Raises:
        ValueError: an entry that is not ``family=weight`` with a whole weight.
    """
    if text.strip().lower() == "none":
        return {}
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, weight = entry.partition("=")
        if not sep or not weight.strip().isdigit():
            raise ValueError(f"family mix entries are family=weight (a whole number), got {entry!r}")
        out[name.strip()] = int(weight)
    return out


def parse_switch(text: str) -> tuple[int, dict[str, int]]:
    """``"3300:position=3,relation=3"`` -> ``(3300, {"position": 3, "relation": 3})`` (``STEP:none``: one each).

    Raises:
        ValueError: text that is not ``STEP:MIX`` with a whole step (the mix as :func:`parse_mix` reads it).
    """
    step, sep, mix = text.partition(":")
    if not sep or not step.strip().isdigit():
        raise ValueError(f"a family mix switch is STEP:FAMILY=W,... (e.g. 3300:position=3), got {text!r}")
    return int(step), parse_mix(mix)


def check_switches(switches: Sequence[Sequence[Any]], steps: int, modalities: Sequence[str]) -> list[list[Any]]:
    """``switches`` (``(step, mix)`` pairs) validated against a run of ``steps`` steps, as ``[[step, mix], ...]``.

    Raises:
        ValueError: a switch step outside ``1 .. steps - 1``, steps not strictly increasing, or a bad mix
            (:func:`check_mix`).
    """
    out: list[list[Any]] = []
    for entry in switches:
        if len(entry) != 2:
            raise ValueError(f"a family mix switch is a (step, mix) pair, got {entry!r}")
        step, mix = entry
        if isinstance(step, bool) or not isinstance(step, int) or not 0 < step < steps:
            raise ValueError(f"a family mix switch's step must be a whole number in 1 .. {steps - 1} (the run "
                             f"has {steps} steps), got {step!r}")
        if out and step <= out[-1][0]:
            raise ValueError(f"family mix switches must be in increasing step order, got {step} after {out[-1][0]}")
        out.append([step, check_mix(mix, modalities)])
    return out


class MixPhase(NamedTuple):
    """One phase of a run's family mix: its first step, its mix and its data offset (as a stage's)."""

    start: int
    mix: dict[str, int]
    items_before: int


def mix_phases(batch_size: int, items_before: int, mix: Mapping[str, int] | None,
               switches: Sequence[Sequence[Any]], modalities: Sequence[str]) -> list[MixPhase]:
    """The phases of a run whose mix is ``mix`` from step 0 and each switch's from its step on.

    Each phase's data offset is where a stage warm-started from the phase before it would start
    (:func:`stage_items`), so no item is drawn twice within the run either.

    Args:
        batch_size: items per step.
        items_before: the run's data offset (``init_from["items"]``; 0 for a fresh run).
        mix: the mix of the first phase (``{}`` or None: each family once).
        switches: ``(step, mix)`` pairs in increasing step order (:func:`check_switches`).
        modalities: the run's training modalities.
    """
    phases = [MixPhase(0, dict(mix or {}), items_before)]
    for step, later in switches:
        last = phases[-1]
        phases.append(MixPhase(step, dict(later),
                               stage_items(last.items_before, batch_size, last.mix, step - last.start, modalities)))
    return phases


def phase_at(phases: Sequence[MixPhase], step: int) -> MixPhase:
    """The phase that step ``step`` (0-based) belongs to."""
    return [p for p in phases if p.start <= step][-1]


def turns(modality: str, mix: Mapping[str, int]) -> list[str]:
    """The turn order of ``modality``'s families: each family ``mix.get(family, 1)`` times, in family order."""
    return [f for f in families(modality) for _ in range(mix.get(f, 1))]


def _floor(items_before: int, modality: str) -> int:
    """The first per-family item index no earlier stage used (its stream stopped before ``items_before``)."""
    return math.ceil(items_before / len(families(modality)))


def mixed_items(modality: str, mix: Mapping[str, int], seed: int, items_before: int, start: int, n: int,
                form: str) -> list[QAItem]:
    """Items ``start .. start + n - 1`` of a mixed stage's ``modality`` stream.

    Stream index ``j`` takes turn ``j % W`` of :func:`turns` (``W`` turns); its family's item index is the
    floor (:func:`_floor`) plus the family's turns before ``j``.

    Args:
        modality: the modality.
        mix: family weights (:func:`check_mix`).
        seed: dataset seed.
        items_before: the stage's data offset (``init_from["items"]``; 0 for a fresh run).
        start: first stream index of this stage.
        n: how many.
        form: the item form (``"mixed"`` in training).
    """
    return [item(modality, "train", index, seed, family=family, form=form)
            for family, index in (mixed_index(modality, mix, items_before, j) for j in range(start, start + n))]


def mixed_index(modality: str, mix: Mapping[str, int], items_before: int, j: int) -> tuple[str, int]:
    """``(family, item index)`` of stream index ``j`` of a mixed stage (see :func:`mixed_items`)."""
    order = turns(modality, mix)
    family = order[j % len(order)]
    k = (j // len(order)) * mix.get(family, 1) + order[:j % len(order)].count(family)
    return family, _floor(items_before, modality) + k


def items_after(settings: Mapping[str, Any], step: int, modalities: Sequence[str]) -> int:
    """The data offset of a stage warm-started from one that ran ``step`` steps with ``settings``.

    That of the phase (:func:`mix_phases`) the run was in after ``step`` steps: see :func:`stage_items`.
    """
    before = (settings.get("init_from") or {"items": 0})["items"]
    phases = mix_phases(settings["batch_size"], before, settings.get("family_mix"),
                        settings.get("family_mix_from") or [], modalities)
    phase = phase_at(phases, step)
    return stage_items(phase.items_before, settings["batch_size"], phase.mix, step - phase.start, modalities)


def stage_items(before: int, batch_size: int, mix: Mapping[str, int] | None, steps: int,
                modalities: Sequence[str]) -> int:
    """The data offset after ``steps`` steps of batch ``batch_size`` with ``mix`` from data offset ``before``.

    ``before + steps * batch`` (the items consumed) without a mix; with one, at least enough that every
    family's uniform stream starts past the mixed items of that family.
    """
    consumed = before + steps * batch_size
    if not mix:
        return consumed
    per = max(1, batch_size // len(modalities))
    for m in modalities:
        order = turns(m, mix)
        used = _floor(before, m) + math.ceil(steps * per / len(order)) * max(mix.get(f, 1) for f in order)
        consumed = max(consumed, used * len(families(m)))
    return consumed
