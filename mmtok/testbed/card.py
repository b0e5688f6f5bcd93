"""The exported testbed model directory and its model card (architecture, training stages, held-out accuracy)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mmtok.adapters import supported_model_types
from mmtok.testbed.data import chance, families
from mmtok.testbed.models import TestbedSpec
from mmtok.testbed.warm_start import TRAINING_RECORD, training_record


def export(spec: TestbedSpec, model: Any, processor: Any, out: Path, settings: dict[str, Any],
           history: dict[str, Any], eval_n: int) -> None:
    """Write ``out``: fp16 weights, config, processor, tokenizer, chat template, card and training record.

    The record (``training.json``) is what a later stage warm-started from ``out`` needs
    (:mod:`mmtok.testbed.warm_start`).
    """
    out.mkdir(parents=True, exist_ok=True)
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half.generation_config = model.generation_config
    half.to(torch.float16).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(spec, model, processor, settings, history, eval_n, out))
    record = training_record(len(history["losses"]), settings, history)
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def model_card(spec: TestbedSpec, model: Any, processor: Any, settings: dict[str, Any], history: dict[str, Any],
               eval_n: int, out: Path) -> str:
    """The model card: architecture, data, training run, held-out accuracy per family beside chance."""
    n_params = sum(p.numel() for p in model.parameters())
    weights = out / "model.safetensors"
    mb = weights.stat().st_size / 1e6 if weights.is_file() else float("nan")
    acc = history["evals"][-1]["acc"] if history["evals"] else {}
    rows = []
    for m in spec.modalities:
        for fam in families(m):
            ch = (chance(fam, "short") + chance(fam, "mc")) / 2
            rows.append(f"| {m} | {fam} | {100 * acc.get(fam, float('nan')):.1f} | {100 * ch:.1f} |")
    curve = [f"| {e['step']} | {100 * e['acc']['mean']:.1f} |" for e in history["evals"]]
    losses = history["losses"]
    return "\n".join([
        f"# {spec.name}",
        "",
        f"A small `{spec.architecture}` trained from scratch by mmtok on its procedurally generated",
        "question-answer data (`mmtok.testbed.data`), as an offline yardstick for token compression. It is",
        "not a general-purpose model: it knows only the testbed's closed vocabulary and task families.",
        "",
        "## Architecture",
        *spec.describe(model, processor),
        f"- {n_params / 1e6:.2f} M parameters; weights {mb:.2f} MB (fp16 safetensors)",
        "",
        "## Training",
        f"- data: train split of `mmtok.testbed.data` ({', '.join(spec.modalities)}), form `{settings['form']}`, "
        f"dataset seed {settings['seed']}, generated on the fly; loss on the answer words and `</s>` only",
        f"- {len(losses)} steps of batch {settings['batch_size']} ({len(losses) * settings['batch_size']} items), "
        f"AdamW lr {settings['lr']} (warm-up {settings['warmup']}, cosine to 10 %), weight decay "
        f"{settings['weight_decay']}, gradient clip 1.0",
        f"- {history['seconds'] / 60:.1f} min on {history.get('hardware') or describe_hardware(model)}, "
        f"final loss {sum(losses[-20:]) / max(1, len(losses[-20:])):.4f} (mean of last 20 steps)",
        f"- reproduce: `mmtok testbed train {spec.name} --steps {settings['steps']} "
        f"--batch-size {settings['batch_size']} --lr {settings['lr']} --seed {settings['seed']} "
        f"--warmup {settings['warmup']} --dense-weight {settings.get('dense_weight', 0.0)} "
        f"--curriculum {settings.get('curriculum', 0.0)} --attention-weight {settings.get('attention_weight', 0.0)} "
        f"--position-code {settings.get('position_code', 0.0)}`"
        + (f", warm-started (`--init-from`) from step {settings['init_from']['step']} of "
           f"`{settings['init_from']['path']}`" if settings.get("init_from") else "")
        + (f", language model from `{settings['init_lm_from']}` (`--init-lm-from`)"
           if settings.get("init_lm_from") else "")
        + (f", image tokens distilled from `{settings['distill_from']}` (`--distill-from`, weight "
           f"{settings['distill_weight']})" if settings.get("distill_from") else "")
        + (f", on {' + '.join(settings['modalities'])} only (`--modalities`)" if settings.get("modalities") else "")
        + (f", position ids moved from 1-D to M-RoPE over the first {settings['position_homotopy']:.0%} of the steps "
           "(`--position-homotopy`)" if settings.get("position_homotopy") else "")
        + (f", video time read-out (`--time-weight {settings['time_weight']}`)" if settings.get("time_weight") else "")
        + (f", video motion read-out (`--motion-weight {settings['motion_weight']}`)"
           if settings.get("motion_weight") else "")
        + (f", video appearance read-out (`--appearance-weight {settings['appearance_weight']}`"
           + (f" `--appearance-layer {settings['appearance_layer']}`" if settings.get("appearance_layer") else "")
           + ")"
           if settings.get("appearance_weight") else "")
        + (", class-balanced read-outs (`--balanced-probe`)" if settings.get("balanced_probe") else "")
        + (", image half read-outs on the position ramp (`--position-ramp`)" if settings.get("position_ramp") else "")
        + _layers_flag(settings, "attention_layers", "attention supervision on layers")
        + _layers_flag(settings, "relevance_layers", "relevance marks after layers")
        + (", relation swaps as their own relevance class (`--swap-marks`)" if settings.get("swap_marks") else "")
        + (", both words of a relation answer attend to it (`--relation-every-word`)"
           if settings.get("relation_every_word") else "")
        + (", position look-alikes as their own relevance class (`--lookalike-marks`)"
           if settings.get("lookalike_marks") else "")
        + (f", family mix (`--family-mix {mix_text(settings['family_mix'])}`)" if settings.get("family_mix") else "")
        + "".join(f", from step {step} family mix (`--family-mix-from {step}:{mix_text(mix) or 'none'}`)"
                  for step, mix in settings.get("family_mix_from", []))
        + ("" if len(losses) >= settings["steps"] else
           f"; this export is the checkpoint at step {len(losses)} of that {settings['steps']}-step run "
           f"(stopped for time; `mmtok testbed train ... --resume` continues it, `mmtok testbed export` "
           "writes the latest checkpoint)"),
        *lineage_rows(settings, history, history.get("hardware") or describe_hardware(model)),
        "",
        "## Held-out accuracy (full tokens)",
        f"Exact match of the greedy answer on the first {eval_n} held-out (`test` split) items per family, form "
        "`mixed` (half short answer, half multiple choice); chance is the mean of the two forms' chance levels.",
        (f"Rerun through `mmtok.compress_then_generate` with `mmtok testbed eval {spec.name}`."
         if model.config.model_type in supported_model_types() else
         "Scored by teacher-forced exact match (`mmtok.testbed.train_measures.heldout_accuracy`: the items greedy "
         f"decoding answers word for word); mmtok has no adapter for `{model.config.model_type}` yet, so "
         "`mmtok testbed eval` and the compressors do not run on it."),
        "",
        "| modality | family | accuracy % | chance % |",
        "|---|---|---|---|",
        *rows,
        f"| | **mean** | **{100 * acc.get('mean', float('nan')):.1f}** | |",
        "",
        "## Held-out mean accuracy during training",
        "| step | mean accuracy % |",
        "|---|---|",
        *curve,
        "",
    ])


STAGE_KEYS = ("steps", "batch_size", "lr", "dense_weight", "curriculum", "attention_weight", "position_code")
# Settings a stage has only when it used them; the card's "sources" column names them.
SOURCE_KEYS = ("init_lm_from", "distill_from", "distill_weight", "modalities", "position_homotopy", "time_weight",
               "motion_weight", "appearance_weight", "appearance_layer", "balanced_probe", "position_ramp",
               "attention_layers", "relevance_layers", "swap_marks", "relation_every_word", "lookalike_marks",
               "family_mix", "family_mix_from")


def mix_text(mix: dict[str, int]) -> str:
    """A family mix as the ``--family-mix`` flag spells it (``direction=3,flash_count=2``)."""
    return ",".join(f"{name}={weight}" for name, weight in mix.items())


def _layers(layers: list[int]) -> str:
    """``[1, 2]`` -> ``"1 and 2"``."""
    names = [str(x) for x in layers]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _layers_flag(settings: dict[str, Any], key: str, text: str) -> str:
    """``", TEXT 1 and 2 (`--KEY 1,2`)"`` for the reproduce line, ``""`` when the run left ``key`` at its default."""
    if not settings.get(key):
        return ""
    flag = key.replace("_", "-")
    return f", {text} {_layers(settings[key])} (`--{flag} {','.join(map(str, settings[key]))}`)"


def stage_sources(settings: dict[str, Any]) -> str:
    """What a stage took from elsewhere or left out, for the card's stage table (``-`` for nothing)."""
    parts = []
    if settings.get("init_lm_from"):
        parts.append(f"language model from `{settings['init_lm_from']}`")
    if settings.get("distill_from"):
        parts.append(f"image tokens distilled from `{settings['distill_from']}` (weight {settings['distill_weight']})")
    if settings.get("modalities"):
        parts.append(f"{' + '.join(settings['modalities'])} only")
    if settings.get("position_homotopy"):
        parts.append(f"positions 1-D -> M-RoPE over {settings['position_homotopy']:.0%} of the steps")
    if settings.get("time_weight"):
        parts.append(f"video time read-out (weight {settings['time_weight']})")
    if settings.get("motion_weight"):
        parts.append(f"video motion read-out (weight {settings['motion_weight']})")
    if settings.get("appearance_weight"):
        parts.append(f"video appearance read-out (weight {settings['appearance_weight']}"
                     f"{', after layer ' + str(settings['appearance_layer']) if settings.get('appearance_layer') else ''})")
    if settings.get("balanced_probe"):
        parts.append("class-balanced read-outs")
    if settings.get("position_ramp"):
        parts.append("position ramp")
    if settings.get("attention_layers"):
        parts.append(f"attention supervision on layers {_layers(settings['attention_layers'])}")
    if settings.get("relevance_layers"):
        parts.append(f"relevance marks after layers {_layers(settings['relevance_layers'])}")
    if settings.get("swap_marks"):
        parts.append("swap marks")
    if settings.get("relation_every_word"):
        parts.append("every relation answer word attends")
    if settings.get("lookalike_marks"):
        parts.append("look-alike marks")
    if settings.get("family_mix"):
        parts.append(f"family mix {mix_text(settings['family_mix'])}")
    for step, mix in settings.get("family_mix_from", []):
        parts.append(f"from step {step} family mix {mix_text(mix) or 'none'}")
    return "; ".join(parts) or "-"


def stage(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training stage, as the model card lists the stages a warm-started model went through."""
    st, hist = state["settings"], state["history"]
    return {"step": state["step"], **{k: st.get(k, 0.0) for k in STAGE_KEYS},
            **{k: st[k] for k in SOURCE_KEYS if k in st}, "minutes": round(hist["seconds"] / 60, 1),
            "hardware": hist.get("hardware", "not recorded")}


def lineage_rows(settings: dict[str, Any], history: dict[str, Any], hardware: str) -> list[str]:
    """The card's table of training stages: each warm-start source (oldest first), then this run."""
    stages = [*(settings.get("init_from") or {}).get("lineage", []),
              {"step": len(history["losses"]), **{k: settings.get(k, 0.0) for k in STAGE_KEYS},
               **{k: settings[k] for k in SOURCE_KEYS if k in settings},
               "minutes": round(history["seconds"] / 60, 1), "hardware": hardware}]
    if len(stages) == 1:
        return []
    rows = [f"| {i + 1} | {s['step']} of {s['steps']} x {s['batch_size']} | {s['lr']} | {s['dense_weight']} / "
            f"{s['curriculum']} / {s['attention_weight']} | {s.get('position_code', 0.0)} | {s['minutes']} | "
            f"{s['hardware']} | {stage_sources(s)} |"
            for i, s in enumerate(stages)]
    return ["", "Stages (each warm-started from the one before, with a fresh schedule; the data continues):", "",
            "| stage | steps x batch | lr | dense / curriculum / attention | position code | minutes | hardware | sources |",
            "|---|---|---|---|---|---|---|---|", *rows]


def describe_hardware(model: Any) -> str:
    """Where ``model`` sits, for the card: ``"one <GPU name> GPU"`` or ``"<machine> CPU (<n> threads)"``."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} GPU"
    return f"{platform.machine()} CPU ({torch.get_num_threads()} threads)"
