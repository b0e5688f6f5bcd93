"""Seeded, resumable training of a testbed model on generated QA items, and its export to ``assets/``.

The loop (:func:`train`; its settings are resolved in :mod:`mmtok.testbed.train_settings` and its read-outs
built in :mod:`mmtok.testbed.train_read_outs`): batch ``s`` is train-split items ``s * B .. (s + 1) * B - 1`` of
:func:`mmtok.testbed.data.dataset` (``form="mixed"``), generated on the fly, so a run is a pure function of
its settings and seed and a resumed run sees exactly the batches an uninterrupted one would. The loss is
the cross-entropy on the answer words and ``</s>`` only (:func:`mmtok.testbed.models.encode_items`);
AdamW with linear warm-up then cosine decay to 10 % of the peak rate. Every ``eval_every`` steps the model
is scored on a fixed held-out sample per family (:mod:`mmtok.testbed.train_measures`); every ``ckpt_every``
steps the model, optimiser, schedule and log go to ``work_dir/checkpoint.pt``. :func:`export` writes the
shipped directory: fp16 safetensors, processor, tokenizer and a model card.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmtok.testbed.card import describe_hardware, export
from mmtok.testbed.curriculum import background_share, keep_mask
from mmtok.testbed.data import dataset, families
from mmtok.testbed.data.images import CELL
from mmtok.testbed.data.items import QAItem
from mmtok.testbed.dense import batch_labels
from mmtok.testbed.dense_audio import audio_batch_labels
from mmtok.testbed.dense_step import dense_parts, pool, split_by_medium
from mmtok.testbed.dense_video import video_batch_labels
from mmtok.testbed.distill import FeatureTeacher, feature_distill_loss, fit_output_layer
from mmtok.testbed.family_mix import mix_phases, mixed_items, phase_at
from mmtok.testbed.media_grid import MEDIA, model_kind, on_layout_grid
from mmtok.testbed.models import TestbedSpec, encode_items, get_spec
from mmtok.testbed.position_code import add_position_code
from mmtok.testbed.position_homotopy import blended_position_ids, homotopy_weight
from mmtok.testbed.train_measures import (
    FORM,
    device_of,
    heldout_accuracy,
    heldout_items,
    media_gain,
    to_device,
)
from mmtok.testbed.train_read_outs import ReadOuts, make_read_outs
from mmtok.testbed.train_settings import recipe_defaults, run_settings
from mmtok.testbed.transfer import transfer_language_model

ROOT = Path(__file__).resolve().parents[2]
# Train-split scenes (of seed + 1, so not a batch the run trains on first) for fitting a Qwen2-VL merger's
# output layer to the distillation teacher: 48 x 256 tokens for 385 x 128 unknowns.
FIT_ITEMS = 48


EVALS_PER_RUN = 6
"""Held-out evaluations of a run that does not say how often (a ``testbed-llava`` one takes ~10-15 s here)."""


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the peak rate at ``step``: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepBatches(torch.utils.data.Dataset):
    """Training batch ``s`` (train-split items ``s * B .. (s + 1) * B - 1``, split evenly over modalities).

    A pure function of ``s``, so a ``DataLoader`` with any number of workers yields the same batches.
    """

    def __init__(self, spec: TestbedSpec, processor: Any, batch_size: int, seed: int, start: int, stop: int,
                 dense: bool = False, item_offset: int = 0, modalities: Sequence[str] | None = None,
                 teacher_pixels: Callable[[list[Any]], torch.Tensor] | None = None,
                 family_mix: dict[str, int] | None = None, family_mix_from: Sequence[Sequence[Any]] = (),
                 relation_every_word: bool = False) -> None:
        self.processor, self.seed, self.start, self.stop, self.dense = processor, seed, start, stop, dense
        self.relation_every_word = relation_every_word
        self.teacher_pixels = teacher_pixels
        self.modalities = list(modalities or spec.modalities)
        self.per = max(1, batch_size // len(self.modalities))
        self.phases = mix_phases(batch_size, item_offset, family_mix, family_mix_from, self.modalities)

    def __len__(self) -> int:
        return self.stop - self.start

    def items(self, i: int) -> list[QAItem]:
        """The items of batch ``i`` (step ``start + i``), each modality's in turn."""
        step = self.start + i
        phase = phase_at(self.phases, step)
        first = (step - phase.start) * self.per  # the phase's stream index of this batch's first item
        items = []
        for m in self.modalities:
            if any(f in phase.mix for f in families(m)):
                items += mixed_items(m, phase.mix, self.seed, phase.items_before, first, self.per, FORM)
            else:
                items += dataset(m, "train", self.per, self.seed, form=FORM, start=phase.items_before + first)
        return items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items = self.items(i)
        batch = encode_items(self.processor, items)
        if self.dense:
            present = {it.modality for it in items}
            image_labels = partial(batch_labels, cell=CELL, relation_every_word=self.relation_every_word)
            for media, make in (("image", image_labels), ("video", video_batch_labels),
                                ("audio", audio_batch_labels)):
                if media in present:
                    batch[f"dense_labels_{media}"] = make(items)
        if self.teacher_pixels is not None:
            batch["teacher_pixel_values"] = self.teacher_pixels([it.media for it in items if it.modality == "image"])
        return batch


def _blend_positions(model: Any, inputs: dict[str, Any], step: int, settings: dict[str, Any]) -> None:
    share = settings.get("position_homotopy", 0.0)
    weight = homotopy_weight(step, settings["steps"], share)
    if share and weight < 1.0:
        inputs["position_ids"] = blended_position_ids(model, inputs, weight)


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a run killed mid-save keeps the previous checkpoint


def train(
    name: str,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    size: str = "full",
    work_dir: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    eval_every: int | None = None,
    eval_n: int = 16,
    ckpt_every: int = 50,
    threads: int | None = None,
    until: int | None = None,
    device: str | None = None,
    workers: int = 0,
    dense_weight: float | None = None,
    curriculum: float | None = None,
    attention_weight: float | None = None,
    position_code: float | None = None,
    init_lm_from: str | Path | None = None,
    distill_from: str | Path | None = None,
    distill_weight: float = 1.0,
    modalities: Sequence[str] | None = None,
    position_homotopy: float = 0.0,
    time_weight: float = 0.0,
    motion_weight: float = 0.0,
    appearance_weight: float = 0.0,
    appearance_layer: int = 1,
    attention_layers: Sequence[int] | None = None,
    relevance_layers: Sequence[int] | None = None,
    balanced_probe: bool = False,
    swap_marks: bool = False,
    relation_every_word: bool = False,
    lookalike_marks: bool = False,
    position_ramp: bool | None = None,
    family_mix: dict[str, int] | None = None,
    family_mix_from: Sequence[tuple[int, dict[str, int]]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train testbed model ``name`` from ``seed``; checkpoint to ``work_dir``; export to ``out`` when given.

    Args:
        name: a testbed name (see :data:`mmtok.testbed.models.SPECS`).
        steps: optimiser steps (the schedule's length); the spec's ``train_defaults`` when None (so too
            for the four below).
        batch_size: items per step.
        lr: peak learning rate.
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay.
        seed: seeds the initial weights and the data (dataset seed).
        size: a size name of the spec (``"full"`` ships, ``"tiny"`` is for tests).
        work_dir: checkpoints and ``log.jsonl``; ``/tmp/<name>`` when None.
        out: directory to export to at the end (e.g. ``assets/<name>``); no export when None.
        resume: continue from ``work_dir/checkpoint.pt`` (same settings), or start fresh when absent.
        init_from: warm start: the weights of another run's ``checkpoint.pt`` (or its work dir), or of an
            exported model directory that records its training (``training.json``), with a fresh
            optimiser and schedule; its data continues after the items that run consumed, so no item is
            seen twice. Recorded in the settings (and the model card).
        eval_every: steps between held-out evaluations (0: none during the run, while an export, ``out``,
            still scores the final weights; None: a sixth of the run's steps, so the evaluations cost a run a
            few per cent of its time whatever its length).
        eval_n: held-out items per family in those evaluations.
        ckpt_every: steps between checkpoints.
        threads: ``torch.set_num_threads`` for the run (unchanged when None).
        until: stop after this step (checkpointed, not exported) without changing the schedule, so that a
            later ``resume=True`` run continues exactly as an uninterrupted one; None runs to ``steps``.
        device: where to train (``"cuda"`` when available, else ``"cpu"``, when None).
        workers: ``DataLoader`` worker processes making batches (0: in the training process, which keeps
            both cores of a small CPU machine for compute; use several on a GPU machine).
        dense_weight: weight of the per-visual-token probe loss (:mod:`mmtok.testbed.dense`) added to the
            answer loss; the spec's default when None; 0 turns it off. Only models whose media tokens each
            cover one cell of the scenes take it (:mod:`mmtok.testbed.media_grid`: the shipped sizes of all
            three testbeds; image, video and audio rows each get their own targets).
        curriculum: share of the steps over which background visual tokens are phased in
            (:mod:`mmtok.testbed.curriculum`); the spec's default when None (0 for a warm start); 0 trains on
            whole images throughout. Needs ``dense_weight > 0`` and a Llava model.
        attention_weight: weight of the attention supervision (:func:`mmtok.testbed.dense.attention_loss`)
            inside the dense loss; the spec's default when None. The language model runs SDPA and the one
            supervised head's rows at the answer positions are computed beside it
            (:func:`mmtok.testbed.attention_rows.query_rows`).
        position_code: amplitude of the 2-D sine-cosine code added to a Llava model's CLIP position
            embeddings when the run starts (:mod:`mmtok.testbed.position_code`; 0: none). None takes the
            spec's default for a run of the shipped size from scratch, and 0 for other sizes and for a warm
            start (whose weights have theirs already).
        init_lm_from: an exported testbed directory (e.g. ``assets/testbed-llava``) whose language model
            starts this one (:func:`mmtok.testbed.transfer.transfer_language_model`); with ``init_from``, it
            replaces the warm start's language model (the rest of the warm start stays).
        distill_from: an exported Llava testbed directory whose visual tokens the model's image tokens are
            regressed onto (:mod:`mmtok.testbed.distill`); needs ``dense_weight > 0`` (the grid tokens) and
            image items in the batches. The first distilled stage of a Qwen2-VL model starts by fitting its
            merger's output layer (:func:`mmtok.testbed.distill.fit_output_layer`); warm starts from a
            distilled stage do not refit.
        distill_weight: weight of that loss, added to the answer and dense losses.
        modalities: the media of the training batches, a subset of the spec's (all when None; e.g. images
            only, whose rows are a quarter as long as Qwen2-VL's video rows). The held-out evaluation keeps
            all of the spec's.
        position_homotopy: share of the steps over which a Qwen2-VL model's position ids move from 1-D to
            M-RoPE (:mod:`mmtok.testbed.position_homotopy`); 0 (default) trains at M-RoPE throughout.
        time_weight: weight of the time read-out (:func:`mmtok.testbed.dense_video.time_terms`: each video
            token names its temporal patch after the first layer) in the dense loss; 0 (default): off.
        motion_weight: weight of the motion read-out (:func:`mmtok.testbed.dense_video.motion_terms`: each
            video object token names which way its object moves within its temporal patch, after the first
            layer) in the dense loss; 0 (default): off.
        appearance_weight: weight of the appearance read-out
            (:func:`mmtok.testbed.dense_video.appearance_terms`: each video object token names which time its
            object is in view, after the first layer) in the dense loss; 0 (default): off.
        appearance_layer: after which language-model layer the appearance read-out reads (1, default: with
            the other read-outs; 2: one layer later, leaving the first layer to find where each appearance
            starts and the second to count the starts); at most the last layer but one.
        attention_layers: the language-model layers whose head 0 the attention supervision trains (None:
            the spec's default for a run of the shipped size from scratch, else
            :data:`mmtok.testbed.dense_step.ATTEND_LAYER`, the second); with several, the attention term is the
            mean over rows and layers. A later layer can answer what needs two layers of question reading
            first (a relation's two named colour-shape pairs).
        relevance_layers: after which language-model layers the relevance marks are read (None:
            :data:`mmtok.testbed.dense_step.RELEVANCE_LAYER`, the first); each layer's marks add to the
            relevance term. Marks read after the second layer can depend on the question's word pairs (the
            first layer can only match single words), which the third layer's attention then reads.
        balanced_probe: the read-outs of the media tokens take each head's class-balanced mean
            (:class:`mmtok.testbed.dense.DenseProbe`, for rare classes such as an audio clip's chirp
            tokens); False (default): the mean over tokens.
        swap_marks: the relevance marks weigh the image tokens of a relation's colour-shape swaps (the clutter's
            orange diamond when the question names the orange square and the purple diamond) as a class of
            their own, beside the key and the other tokens (:func:`mmtok.testbed.dense.relevance_terms`):
            otherwise a swap is one "no" token among ~250 and the marks say "yes" on it. It applies to the
            marks read after the later ``relevance_layers`` (the first layer can only match single words), so
            it needs one beyond the first. False (default): off.
        relation_every_word: the attention supervision points both words of a relation answer ("colour
            shape") at the object that answers (:func:`mmtok.testbed.dense.answer_order`), not only the first,
            so that the second word reads the same object's shape. False (default): the first word only.
        lookalike_marks: the relevance marks weigh a position question's look-alikes (the objects that share
            the named colour or shape in the other quadrants, :func:`mmtok.testbed.dense.lookalike_cells`) as a
            class of their own, after every relevance layer. False (default): they are other tokens.
        position_ramp: the image tokens' half read-outs ("top" / "bottom", "left" / "right") are trained
            toward each cell's place along its axis (:func:`mmtok.testbed.dense.position_ramp`), not the
            hard half, so that two objects in the same half can be compared; False: hard halves; None: the
            spec's default for a run of the shipped size from scratch, else False.
        family_mix: family weights in the turn order of the training items (:mod:`mmtok.testbed.family_mix`,
            e.g. ``{"direction": 3}``: three direction items per turn of the video families); ``{}``: each
            family once; None: the spec's default for a run of the shipped size from scratch, else ``{}``.
        family_mix_from: changes of the family mix within the run, ``(step, mix)`` pairs in increasing step
            order (e.g. ``[(3300, {"position": 3, "relation": 3})]``: from step 3,300 on); each phase's items are
            numbered on past the phases before it (:func:`mmtok.testbed.family_mix.mix_phases`), and the weights
            and schedule carry on. None (default): ``family_mix`` throughout.
        log: where progress lines go.

    Returns:
        ``{"losses": [...], "evals": [{"step", "acc"}...], "model", "processor", "seconds", "settings"}``.

    Raises:
        ValueError: an unknown name or size, non-positive steps / batch size, modalities the spec lacks, or
            distillation without image batches, dense tokens or a matching teacher, or a time, motion or appearance
            read-out without video batches and dense tokens, or an appearance layer the answer cannot read.
    """
    spec = get_spec(name)
    settings, warm = run_settings(
        spec, size=size, seed=seed, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
        weight_decay=weight_decay, init_from=init_from, dense_weight=dense_weight, curriculum=curriculum,
        attention_weight=attention_weight, position_code=position_code, init_lm_from=init_lm_from,
        distill_from=distill_from, distill_weight=distill_weight, modalities=modalities,
        position_homotopy=position_homotopy, time_weight=time_weight, motion_weight=motion_weight,
        appearance_weight=appearance_weight, appearance_layer=appearance_layer, attention_layers=attention_layers,
        relevance_layers=relevance_layers, balanced_probe=balanced_probe, swap_marks=swap_marks,
        relation_every_word=relation_every_word, lookalike_marks=lookalike_marks, position_ramp=position_ramp,
        family_mix=family_mix, family_mix_from=family_mix_from)
    model, processor = spec.build(size, seed)
    if position_homotopy and model_kind(model) != "qwen2vl":
        raise ValueError("the position homotopy moves Qwen2-VL's M-RoPE positions: use it with testbed-qwen2vl")
    shape = spec.sizes[size] if isinstance(size, str) else size
    on_grid = on_layout_grid(model, shape)
    recipe_defaults(settings, spec, on_grid)
    if threads is not None:
        torch.set_num_threads(threads)
    work = Path(work_dir) if work_dir is not None else default_work_dir(name)
    work.mkdir(parents=True, exist_ok=True)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    read_outs = make_read_outs(model, processor, spec, settings, on_grid, shape)
    teacher = _teacher(settings, model, read_outs)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=settings["lr"], betas=(0.9, 0.98), weight_decay=settings["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, settings["steps"], settings["warmup"]))
    ckpt = work / "checkpoint.pt"
    history: dict[str, Any] = {"losses": [], "evals": [], "seconds": 0.0}
    start_step = 0
    _prepare_weights(model, processor, settings, warm, teacher, log)
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location=device_of(model))
        if state["settings"] != settings:
            raise ValueError(f"checkpoint {ckpt} was made with {state['settings']}, not {settings}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history, start_step = state["history"], state["step"]
        log(f"resumed {name} at step {start_step} from {ckpt}")
    if eval_every is None:
        eval_every = max(1, settings["steps"] // EVALS_PER_RUN)
    heldout = heldout_items(spec, eval_n, seed) if eval_every or out else []
    logf = (work / "log.jsonl").open("a")
    t0 = time.perf_counter() - history["seconds"]
    model.train()
    stop = settings["steps"] if until is None else min(until, settings["steps"])
    batches = torch.utils.data.DataLoader(
        StepBatches(spec, processor, settings["batch_size"], seed, start_step, max(start_step, stop),
                    dense=bool(read_outs.probes),
                    item_offset=settings.get("init_from", {"items": 0})["items"],
                    modalities=settings.get("modalities"),
                    teacher_pixels=teacher.pixels if teacher is not None else None,
                    family_mix=settings.get("family_mix"),
                    family_mix_from=settings.get("family_mix_from", ()),
                    relation_every_word=settings.get("relation_every_word", False)),
        batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)
    history["hardware"] = describe_hardware(model)
    for step, batch in zip(range(start_step, stop), batches, strict=True):
        total, loss, dense, terms, distill = _step_losses(model, to_device(batch, device_of(model)), step, settings,
                                                          read_outs, teacher)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history["losses"].append(loss.item())
        history["seconds"] = time.perf_counter() - t0
        rec: dict[str, Any] = {"step": step + 1, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0],
                               "seconds": round(history["seconds"], 1)}
        if dense is not None:
            history.setdefault("dense_losses", []).append(dense.item())
            rec["dense_loss"] = round(dense.item(), 4)
            rec["dense_terms"] = {k: round(v, 4) for k, v in terms.items()}
        if distill is not None:
            history.setdefault("distill_losses", []).append(distill.item())
            rec["distill_loss"] = round(distill.item(), 4)
        last = step + 1 == settings["steps"]
        if eval_every and ((step + 1) % eval_every == 0 or last):
            acc = heldout_accuracy(model, processor, heldout)
            gain = media_gain(model, processor, heldout[:: max(1, len(heldout) // 32)])
            history["evals"].append({"step": step + 1, "acc": acc, "media_gain": gain})
            rec["heldout"] = {k: round(v, 3) for k, v in acc.items()}
            rec["media_gain"] = round(gain, 4)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        if (step + 1) % 10 == 0 or "heldout" in rec or step == start_step:
            log(json.dumps(rec))
        if (step + 1) % ckpt_every == 0 or last or step + 1 == stop:
            _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "step": step + 1, "history": history, "settings": settings})
    logf.close()
    model.eval()
    if out is not None and stop == settings["steps"]:
        if not history["evals"] or history["evals"][-1]["step"] != settings["steps"]:
            history["evals"].append({"step": settings["steps"], "acc": heldout_accuracy(model, processor, heldout)})
        export(spec, model, processor, Path(out), settings, history, eval_n)
        log(f"exported {name} to {out}")
    return {**history, "model": model, "processor": processor, "settings": settings}


def _teacher(settings: dict[str, Any], model: Any, read_outs: ReadOuts) -> FeatureTeacher | None:
    """The distillation teacher ``settings`` name, checked against the model; None without distillation."""
    if "distill_from" not in settings:
        return None
    if not read_outs.probes:
        raise ValueError("distillation reads the image tokens on the scenes' grid: use dense_weight > 0")
    teacher = FeatureTeacher(settings["distill_from"], device_of(model))
    if teacher.hidden_size != model.config.text_config.hidden_size:
        raise ValueError(f"the teacher's visual tokens are {teacher.hidden_size} wide, this model's language "
                         f"model takes {model.config.text_config.hidden_size}")
    return teacher


def _prepare_weights(model: Any, processor: Any, settings: dict[str, Any], warm: dict[str, Any] | None,
                     teacher: FeatureTeacher | None, log: Callable[[str], None]) -> None:
    """The run's starting weights before a resume: warm start, copied language model, position code, fit."""
    name = settings["name"]
    if warm is not None:
        model.load_state_dict(warm["model"])
        log(f"warm start of {name} from step {warm['step']} of {settings['init_from']['path']}")
    if "init_lm_from" in settings:  # after a warm start, whose language model it replaces
        moved = transfer_language_model(model, processor.tokenizer, settings["init_lm_from"])
        log(f"language model of {name} from {settings['init_lm_from']}: {moved}")
    if settings["position_code"] > 0:  # before a resume, which loads weights that have it already
        add_position_code(model, settings["position_code"])
    # Only the first distilled stage fits (a later one would move tokens its language model has adapted to);
    # a resume loads the fitted weights.
    first_distilled = warm is None or not warm["settings"].get("distill_from")
    if teacher is not None and model_kind(model) == "qwen2vl" and first_distilled:
        fit = fit_output_layer(model, processor, teacher,
                               list(dataset("image", "train", FIT_ITEMS, settings["seed"] + 1, form=FORM)))
        log(f"merger output layer fitted to {teacher.source} on {FIT_ITEMS} images: distillation loss "
            f"{fit['before']:.4f} -> {fit['after']:.4f}")


def _step_losses(model: Any, batch: dict[str, Any], step: int, settings: dict[str, Any], read_outs: ReadOuts,
                 teacher: FeatureTeacher | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                           dict[str, float], torch.Tensor | None]:
    """One training step's losses: ``(total, answer loss, dense loss or None, dense terms, distillation or None)``."""
    if not read_outs.probes:
        _blend_positions(model, batch, step, settings)
        loss = model(**batch).loss
        return loss, loss, None, {}, None
    labels = {m: batch.pop(f"dense_labels_{m}") for m in MEDIA if f"dense_labels_{m}" in batch}
    teacher_pixels = batch.pop("teacher_pixel_values", None)
    share = background_share(step, settings["steps"], settings["curriculum"])
    keep = (keep_mask(labels["image"], share, torch.Generator().manual_seed(settings["seed"] * 1_000_003 + step))
            if share < 1 else None)
    blend = partial(_blend_positions, model, step=step, settings=settings)
    parts = [dense_parts(model, sub, labels, read_outs.probes, read_outs.yes_no, settings["attention_weight"] > 0,
                         keep, blend, read_outs.time, read_outs.motion, read_outs.appearance,
                         read_outs.appearance_layer, read_outs.attention_layers, read_outs.relevance_layers,
                         read_outs.swap_class, read_outs.lookalike_class)
             for sub in split_by_medium(model, batch)]
    loss, dense, terms = pool(parts, settings["attention_weight"], settings.get("time_weight", 0.0),
                              settings.get("motion_weight", 0.0), settings.get("appearance_weight", 0.0))
    total = loss + settings["dense_weight"] * dense
    distill = None
    if teacher is not None:
        image_tokens = next(p.tokens["image"] for p in parts if "image" in p.tokens)
        distill = feature_distill_loss(image_tokens, teacher.tokens(teacher_pixels))
        total = total + settings["distill_weight"] * distill
    return total, loss, dense, terms, distill


def default_work_dir(name: str) -> Path:
    """``/tmp/<name>``: where a run keeps its checkpoint unless told."""
    return Path("/tmp") / name


def default_out(name: str) -> Path:
    """``assets/<name>`` in the repository."""
    return ROOT / "assets" / name


def export_checkpoint(name: str, work_dir: str | Path | None = None, out: str | Path | None = None,
                      eval_n: int = 16) -> Path:
    """Export the latest checkpoint of a (possibly unfinished) run, scoring it on the held-out items first.

    Raises:
        FileNotFoundError: ``work_dir`` holds no ``checkpoint.pt``.
    """
    spec = get_spec(name)
    work = Path(work_dir) if work_dir is not None else default_work_dir(name)
    ckpt = work / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; train first with `mmtok testbed train {name}`")
    state = torch.load(ckpt, weights_only=False, map_location="cpu")  # a GPU run exports on any machine
    settings, history = state["settings"], state["history"]
    model, processor = spec.build(settings["size"], settings["seed"])
    model.load_state_dict(state["model"])
    model.eval()
    # Always re-scored: the card states eval_n items per family, which the run's own evaluations may not use.
    acc = heldout_accuracy(model, processor, heldout_items(spec, eval_n, settings["seed"]))
    if history["evals"] and history["evals"][-1]["step"] == state["step"]:
        history["evals"].pop()
    history["evals"].append({"step": state["step"], "acc": acc})
    target = Path(out) if out is not None else default_out(name)
    export(spec, model, processor, target, settings, history, eval_n)
    return target
