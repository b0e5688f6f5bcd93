"""More training items of some families: a weighted turn order, with no item drawn twice across stages.

By default a stage's items of one modality take the families in turn (:func:`mmtok.testbed.data.item`:
stream index ``i`` is item ``i // F`` of family ``i % F``), so each of a video batch's 8 items is one of 7
families and a family the model finds hard gets no more practice than one it has learned. A family mix
``{"direction": 3}`` repeats a family in the turn order (here 9 turns: "direction" three times, the other six
once). Each family's items in a mixed stage are numbered on from a floor above every item index an earlier
stage can have used, and :func:`items_after` moves the next stage's data offset past the mixed stage's items,
so a chain of warm-started stages, mixed or not, never sees an item twice (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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

    ``before + step * batch`` (the items it consumed) for a stage without a mix; for a mixed stage, at least
    enough that every family's uniform stream starts past the mixed stage's last item of that family.
    """
    before = (settings.get("init_from") or {"items": 0})["items"]
    consumed = before + step * settings["batch_size"]
    mix = settings.get("family_mix") or {}
    if not mix:
        return consumed
    per = max(1, settings["batch_size"] // len(modalities))
    for m in modalities:
        order = turns(m, mix)
        used = _floor(before, m) + math.ceil(step * per / len(order)) * max(mix.get(f, 1) for f in order)
        consumed = max(consumed, used * len(families(m)))
    return consumed
