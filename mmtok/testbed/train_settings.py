"""A training run's settings: :func:`mmtok.testbed.train.train`'s arguments, the spec's defaults and their checks.

The settings dict is what a checkpoint records and a resume must match, and what the model card and a
later warm start's lineage read; so an option that is off leaves no key (older runs' settings still
resume). :func:`run_settings` resolves everything that does not need the model; :func:`recipe_defaults`
fills in the dense recipe's defaults once the model is built, since they depend on whether its media tokens
lie on the scenes' layout grid (:mod:`mmtok.testbed.media_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmtok.testbed.card import stage
from mmtok.testbed.dense_step import ATTEND_LAYER, RELEVANCE_LAYER
from mmtok.testbed.family_mix import check_mix, check_switches, items_after
from mmtok.testbed.models import TestbedSpec
from mmtok.testbed.position_homotopy import homotopy_weight
from mmtok.testbed.train_measures import FORM
from mmtok.testbed.warm_start import load_warm_start

FRESH_RECIPE = ("position_ramp", "attention_layers", "family_mix")
"""Options a run from scratch of the shipped size takes from the spec's ``train_defaults`` unless named."""


def run_settings(
    spec: TestbedSpec,
    *,
    size: str,
    seed: int,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    warmup: int | None,
    weight_decay: float | None,
    init_from: str | Path | None,
    dense_weight: float | None,
    curriculum: float | None,
    attention_weight: float | None,
    position_code: float | None,
    init_lm_from: str | Path | None,
    distill_from: str | Path | None,
    distill_weight: float,
    modalities: Sequence[str] | None,
    position_homotopy: float,
    time_weight: float,
    motion_weight: float,
    appearance_weight: float,
    appearance_layer: int,
    attention_layers: Sequence[int] | None,
    relevance_layers: Sequence[int] | None,
    balanced_probe: bool,
    swap_marks: bool,
    position_ramp: bool | None,
    family_mix: dict[str, int] | None,
    family_mix_from: Sequence[tuple[int, dict[str, int]]] | None = None,
    relation_every_word: bool = False,
    lookalike_marks: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The settings of a run of ``spec`` (the arguments are :func:`mmtok.testbed.train.train`'s).

    ``dense_weight``, ``curriculum`` and ``attention_weight`` stay None when not given, and so do the
    :data:`FRESH_RECIPE` options a run from scratch does not name: see :func:`recipe_defaults`.

    Returns:
        The settings, and the warm start's state (:func:`mmtok.testbed.warm_start.load_warm_start`) when
        ``init_from`` is given, else None.

    Raises:
        ValueError: an invalid homotopy share, family mix or switch, attention / relevance layers, an appearance layer
            without its read-out, modalities the spec lacks, or the position ramp or distillation without
            image batches.
    """
    d = spec.train_defaults
    settings: dict[str, Any] = {
        "name": spec.name, "size": size, "seed": seed, "steps": steps or d.get("steps", 1000),
        "batch_size": batch_size or d.get("batch_size", 16), "lr": lr or d.get("lr", 1e-3),
        "warmup": d.get("warmup", 50) if warmup is None else warmup,
        "weight_decay": d.get("weight_decay", 0.01) if weight_decay is None else weight_decay, "form": FORM,
        "dense_weight": dense_weight, "curriculum": curriculum,
        "attention_weight": attention_weight,
        "position_code": (d.get("position_code", 0.0) if init_from is None and size == "full" else 0.0)
        if position_code is None else position_code,
    }
    if init_lm_from is not None:
        settings["init_lm_from"] = str(init_lm_from)
    if position_homotopy:
        homotopy_weight(0, 1, position_homotopy)  # validates the share
        settings["position_homotopy"] = float(position_homotopy)
    if time_weight:
        settings["time_weight"] = float(time_weight)
    if motion_weight:
        settings["motion_weight"] = float(motion_weight)
    if appearance_layer != 1 and not appearance_weight:
        raise ValueError("appearance_layer places the appearance read-out: use it with appearance_weight > 0")
    if appearance_weight:
        settings["appearance_weight"] = float(appearance_weight)
        if appearance_layer != 1:  # absent at the first layer, as before the option existed
            settings["appearance_layer"] = int(appearance_layer)
    # Absent at their defaults, as before the options existed: earlier runs' settings still resume.
    for key, given, default, lowest in (("attention_layers", attention_layers, ATTEND_LAYER, 0),
                                        ("relevance_layers", relevance_layers, RELEVANCE_LAYER, 1)):
        layers = _chosen_layers(key, given, default, lowest)
        if layers is not None:
            settings[key] = layers
    if balanced_probe:
        settings["balanced_probe"] = True
    if swap_marks:
        settings["swap_marks"] = True
    if position_ramp:
        settings["position_ramp"] = True
    if relation_every_word:
        settings["relation_every_word"] = True
    if lookalike_marks:
        settings["lookalike_marks"] = True
    if modalities is not None:
        unknown = sorted(set(modalities) - set(spec.modalities))
        if unknown or not modalities:
            raise ValueError(f"{spec.name} trains on {list(spec.modalities)} (or a subset), not {list(modalities)}")
        settings["modalities"] = [m for m in spec.modalities if m in modalities]
    media = settings.get("modalities", spec.modalities)
    if position_ramp and "image" not in media:
        raise ValueError("the position ramp trains the image tokens' half read-outs: train on images")
    if family_mix:
        settings["family_mix"] = check_mix(family_mix, media)
    if family_mix_from:  # absent without switches, as before the option existed
        settings["family_mix_from"] = check_switches(family_mix_from, settings["steps"], media)
    if distill_from is not None:
        if "image" not in media:
            raise ValueError("distillation regresses image tokens: train on images (modalities with 'image')")
        settings["distill_from"], settings["distill_weight"] = str(distill_from), float(distill_weight)
    if init_from is None:
        given = {"position_ramp": position_ramp, "attention_layers": attention_layers, "family_mix": family_mix}
        settings.update({key: None for key in FRESH_RECIPE if given[key] is None})
    warm = None
    if init_from is not None:
        warm, source = load_warm_start(init_from)
        before = warm["settings"].get("init_from") or {"items": 0}
        warm_media = warm["settings"].get("modalities") or spec.modalities
        settings["init_from"] = {"path": str(source), "step": warm["step"],
                                 "items": items_after(warm["settings"], warm["step"], warm_media),
                                 "lineage": [*before.get("lineage", []), stage(warm)]}
    return settings, warm


def _chosen_layers(key: str, given: Sequence[int] | None, default: int, lowest: int) -> list[int] | None:
    """``given`` sorted, or None when it is absent or just ``[default]``.

    Raises:
        ValueError: an empty list, a repeated layer or one below ``lowest`` (the upper bound needs the model:
            :func:`mmtok.testbed.train_read_outs.make_read_outs`).
    """
    if given is None or list(given) == [default]:
        return None
    layers = sorted({int(x) for x in given})
    if not layers or layers[0] < lowest or len(layers) != len(given):
        raise ValueError(f"{key} must list distinct layer indices >= {lowest}, got {list(given)}")
    return layers


def recipe_defaults(settings: dict[str, Any], spec: TestbedSpec, on_grid: bool) -> None:
    """Fill in the dense recipe's weights left None by :func:`run_settings`, in place, and check them.

    The spec's dense / curriculum defaults are the shipped size's recipe: other sizes (the test-sized
    "tiny") and models whose media tokens are not on the layout grid (``on_grid`` False) train without them
    unless asked. The curriculum (easy-first) is for a model that cannot read its images yet, so a warm
    start does not take it by default; nor the other :data:`FRESH_RECIPE` options (a warm-started stage
    names what it adds).

    Raises:
        ValueError: attention supervision, swap marks, look-alike marks or the curriculum without the dense
            probe, attention layers or relation_every_word without attention supervision, swap marks,
            look-alike marks or relation_every_word without images, swap marks without a relevance layer
            beyond the first, or non-positive steps or batch size.
    """
    d = spec.train_defaults
    shipped = settings["size"] == "full" and on_grid
    if settings["dense_weight"] is None:
        settings["dense_weight"] = d.get("dense_weight", 0.0) if shipped else 0.0
    fresh = shipped and settings["dense_weight"] > 0 and "init_from" not in settings
    if settings["curriculum"] is None:
        settings["curriculum"] = d.get("curriculum", 0.0) if fresh else 0.0
    if settings["attention_weight"] is None:
        settings["attention_weight"] = d.get("attention_weight", 0.0) if settings["dense_weight"] > 0 else 0.0
    _fresh_recipe(settings, d if fresh else {}, spec.modalities)
    if "attention_layers" in settings and settings["attention_weight"] <= 0:
        raise ValueError("attention_layers places the attention supervision: use it with attention_weight > 0")
    if settings["attention_weight"] > 0 and settings["dense_weight"] <= 0:
        raise ValueError("attention supervision needs the key cells of the dense labels: use dense_weight > 0")
    if settings.get("relation_every_word") and (settings["attention_weight"] <= 0
                                                or "image" not in settings.get("modalities", spec.modalities)):
        raise ValueError("relation_every_word points the attention supervision of a relation answer's words at "
                         "the object that answers: use it with attention_weight > 0 and image batches")
    if settings.get("lookalike_marks") and (settings["dense_weight"] <= 0
                                            or "image" not in settings.get("modalities", spec.modalities)):
        raise ValueError("lookalike_marks weigh a position question's look-alikes in the image relevance marks: "
                         "use them with dense_weight > 0 and image batches")
    if settings.get("swap_marks") and (settings["dense_weight"] <= 0
                                       or "image" not in settings.get("modalities", spec.modalities)
                                       or max(settings.get("relevance_layers", [RELEVANCE_LAYER])) <= RELEVANCE_LAYER):
        raise ValueError("swap marks weigh relation swaps in the image relevance marks read after a later layer "
                         f"than the first (which can only match single words): use them with dense_weight > 0, "
                         f"image batches and relevance_layers beyond {RELEVANCE_LAYER} (e.g. [1, 2])")
    if settings["curriculum"] > 0 and settings["dense_weight"] <= 0:
        raise ValueError("the curriculum needs the scene's content cells: use it with dense_weight > 0")
    if settings["steps"] < 1 or settings["batch_size"] < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {settings['steps']} and {settings['batch_size']}")


def _fresh_recipe(settings: dict[str, Any], defaults: dict[str, Any], modalities: Sequence[str]) -> None:
    """Replace the :data:`FRESH_RECIPE` options left None with ``defaults``' (none when it lacks them), in place.

    As for options named by the caller, a key stays only when the option is on and off its default.
    """
    media = settings.get("modalities", modalities)
    for key in FRESH_RECIPE:
        if key not in settings or settings[key] is not None:
            continue
        del settings[key]
        value = defaults.get(key)
        if key == "position_ramp" and value and "image" in media:
            settings[key] = True
        elif key == "attention_layers" and value and settings["attention_weight"] > 0:
            layers = _chosen_layers(key, value, ATTEND_LAYER, 0)
            if layers is not None:
                settings[key] = layers
        elif key == "family_mix" and value:
            settings[key] = check_mix(value, media)
