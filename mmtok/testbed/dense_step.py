"""The losses of one dense-supervised training step, pooled exactly over the media of a mixed batch.

A ``testbed-qwen2vl`` batch mixes image rows (278 tokens) and video rows (1,180): in one forward pass the
image rows are padded to the video length, and the language model computes on the padding as on real
tokens (SDPA on the CPU masks it but still runs the blocks), so half of a batch of 8 images and 8 videos is
padding. :func:`split_by_medium` cuts such a batch into one sub-batch per medium, each trimmed to its own
longest row; :func:`dense_parts` runs one forward pass and returns each loss as a sum with its count
(answer tokens, media tokens per relevance class, rows with key tokens), and :func:`pool` adds the
sub-batches' sums and divides by the pooled counts, which gives the very losses of the unsplit batch (a
test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from mmtok.testbed.attention_rows import answer_query_positions, query_rows
from mmtok.testbed.dense import DenseProbe, attention_terms, balanced_mean, relevance_terms
from mmtok.testbed.dense_video import (
    APPEARANCE_COLUMN,
    APPEARANCE_WORDS,
    MOTION_COLUMN,
    appearance_terms,
    motion_terms,
    time_terms,
)
from mmtok.testbed.media_grid import grid_inputs, model_kind
from mmtok.testbed.models import IGNORE, TOKEN_KEYS

# The relevance marks are read out after the first language-model layer (through the final norm and the tied
# head), so that the later layers' attention from the answer position can use them; read out at the last
# layer, they were learned (every key cell marked) but came too late to be attended to.
RELEVANCE_LAYER = 1
# Attention supervision (dense.attention_loss) on the layer after the marks: its head 0 at the answer position.
ATTEND_LAYER = 1
# Qwen2-VL's media tensors per medium, and the config attribute of its placeholder token.
_MEDIA_KEYS = {"image": ("pixel_values", "image_grid_thw", "image_token_id"),
               "video": ("pixel_values_videos", "video_grid_thw", "video_token_id")}


@dataclass
class DenseParts:
    """One forward pass's losses as sums and counts (see :func:`pool`).

    Attributes:
        answer_sum: summed cross-entropy of the answer tokens; ``answer_count`` of them.
        probe: the dense probes' loss, summed over this pass's media (each a mean over its own tokens).
        relevance_sums: ``[4]`` relevance cross-entropy sums over other, key, swap and look-alike tokens (the
            last two classes are empty unless the marks weigh them: ``swap_class``, ``lookalike_class``);
            ``relevance_counts``.
        attention_sum: attention-supervision loss summed over ``attention_count`` rows (0 when off).
        time_sum: the time read-out's cross-entropy summed over ``time_count`` video tokens (0 when off).
        motion_sums: ``[2]`` the motion read-out's cross-entropy sums over still and moved object tokens;
            ``motion_counts`` (zeros when off).
        appearance_sums: ``[K]`` the appearance read-out's cross-entropy sums over the object tokens of each
            class; ``appearance_counts`` (zeros when off).
        tokens: per medium, ``[n_media, N, hidden]`` the media tokens the language model received.
    """

    answer_sum: torch.Tensor
    answer_count: int
    probe: torch.Tensor
    relevance_sums: torch.Tensor
    relevance_counts: torch.Tensor
    attention_sum: torch.Tensor
    attention_count: int
    time_sum: torch.Tensor
    time_count: int
    motion_sums: torch.Tensor
    motion_counts: torch.Tensor
    appearance_sums: torch.Tensor
    appearance_counts: torch.Tensor
    tokens: dict[str, torch.Tensor]


def split_by_medium(model: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A Qwen2-VL batch with image rows and video rows -> an image sub-batch and a video sub-batch.

    Each sub-batch keeps its rows' per-token tensors (:data:`~mmtok.testbed.models.TOKEN_KEYS`), cut to its
    longest row (the rows are right-padded), and its medium's pixel values and grids whole. Batches of
    other models, of one medium, or with a row holding both media or neither are returned whole.

    Args:
        model: the model being trained.
        batch: a right-padded batch of :func:`mmtok.testbed.models.encode_items`.

    Returns:
        The sub-batches, in the order image, video (or ``[batch]``).
    """
    if model_kind(model) != "qwen2vl":
        return [batch]
    ids = batch["input_ids"]
    rows = {m: (ids == getattr(model.config, keys[2])).any(1) for m, keys in _MEDIA_KEYS.items()
            if batch.get(keys[0]) is not None}
    if len(rows) < 2 or (rows["image"] & rows["video"]).any() or not (rows["image"] | rows["video"]).all():
        return [batch]
    out = []
    for medium, keep in rows.items():
        length = int(batch["attention_mask"][keep].sum(1).max())
        sub = {k: v[keep, :length] for k, v in batch.items() if k in TOKEN_KEYS}
        pixels, grid, _ = _MEDIA_KEYS[medium]
        sub[pixels], sub[grid] = batch[pixels], batch[grid]
        out.append(sub)
    return out


def layer_logits(model: Any, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """``[B, L, V]`` next-word logits of the states after ``layer`` (the final norm, then the tied head)."""
    return model.lm_head(model.model.language_model.norm(hidden_states[layer]))


def dense_parts(model: Any, batch: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                probes: dict[str, DenseProbe], yes_no: Sequence[int], attend: bool,
                keep: torch.Tensor | None = None,
                positions: Callable[[dict[str, Any]], None] | None = None,
                time: Sequence[int] | None = None, motion: Sequence[int] | None = None,
                appearance: Sequence[int] | None = None, appearance_layer: int = RELEVANCE_LAYER,
                attention_layers: Sequence[int] = (ATTEND_LAYER,),
                relevance_layers: Sequence[int] = (RELEVANCE_LAYER,), swap_class: bool = False,
                lookalike_class: bool = False) -> DenseParts:
    """One forward pass of ``batch`` with the dense supervision's read-outs.

    Args:
        model: a testbed model whose media tokens lie on the scenes' grids (:mod:`mmtok.testbed.media_grid`).
        batch: the model's inputs with ``labels``.
        labels: per medium, ``[n_media, N, 5]`` dense targets (:func:`mmtok.testbed.dense.batch_labels`); the
            media this batch holds are used.
        probes: per medium, its :class:`~mmtok.testbed.dense.DenseProbe`.
        yes_no: token ids of "yes" and "no" (the relevance marks).
        attend: compute the attention supervision (head 0 of each of ``attention_layers``).
        keep: ``[n_images, N]`` the image tokens kept by the curriculum (Llava only), or None.
        positions: edits the built inputs in place before the forward pass (the position homotopy).
        time: the :func:`~mmtok.testbed.dense_video.time_words` when video tokens are trained to name their
            temporal patch (:func:`~mmtok.testbed.dense_video.time_terms`); None: not.
        motion: the :func:`~mmtok.testbed.dense_video.motion_words` when video object tokens are trained to
            name their step (:func:`~mmtok.testbed.dense_video.motion_terms`); None: not.
        appearance: the :func:`~mmtok.testbed.dense_video.appearance_words` when video object tokens are
            trained to name which time their object is visible
            (:func:`~mmtok.testbed.dense_video.appearance_terms`); None: not.
        appearance_layer: after which layer the appearance read-out reads the object tokens (1: with the
            other read-outs; 2: one layer later, so that the first layer can mark where each appearance
            starts and the second count the starts; the answer then reads the count in the third).
        attention_layers: the language-model layers whose head 0 the attention supervision trains
            (:data:`ATTEND_LAYER` by default); with several, the term is the mean over rows and layers.
        relevance_layers: after which layers the relevance marks are read (:data:`RELEVANCE_LAYER` by
            default; the time, motion and appearance read-outs stay after theirs); with several, each layer's
            sums and counts add.
        swap_class: the relevance marks read after a layer later than :data:`RELEVANCE_LAYER` weigh the
            tokens of a relation's colour-shape swaps as a class of their own
            (:func:`mmtok.testbed.dense.relevance_terms`); the first layer's marks keep them among the other
            tokens, since one layer can only match single words and cannot tell a swap from the named pair.
        lookalike_class: the relevance marks (after every layer of ``relevance_layers``) weigh the tokens of a
            position question's look-alikes as a class of their own (:func:`mmtok.testbed.dense.lookalike_cells`).
    """
    grid = grid_inputs(model, batch, keep)
    if positions is not None:
        positions(grid.inputs)
    answers = grid.inputs.pop("labels")  # the loss is computed here, as a sum (see pool)
    with grid.capturing(), ExitStack() as stack:
        queries = answer_query_positions(answers)
        layer_rows = [stack.enter_context(query_rows(model, layer, queries)) for layer in attention_layers if attend]
        outputs = model(**grid.inputs, output_hidden_states=True)
    targets = answers[:, 1:]
    answer_count = int((targets != IGNORE).sum())
    answer_sum = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].float().reshape(-1, outputs.logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, reduction="sum")
    lens = layer_logits(model, outputs.hidden_states, RELEVANCE_LAYER)
    # Targets: the probe heads' columns first, then the key flag and the answer-word order.
    probe = sum(probes[m](grid.tokens[m], labels[m]) for m in grid.tokens)
    flags = grid.per_row({m: labels[m][..., -2:] for m in grid.tokens})
    relevance_sums, relevance_counts = 0, 0
    for layer in relevance_layers:
        read = lens if layer == RELEVANCE_LAYER else layer_logits(model, outputs.hidden_states, layer)
        layer_sums, layer_counts = relevance_terms(read, grid.cells, flags[..., 0], *yes_no,
                                                   swap_class and layer > RELEVANCE_LAYER, lookalike_class)
        relevance_sums, relevance_counts = relevance_sums + layer_sums, relevance_counts + layer_counts
    attention_sum, attention_count = answer_sum.new_zeros(()), 0
    for rows in layer_rows:
        layer_sum, layer_count = attention_terms(rows, answers, grid.cells, flags[..., 0], flags[..., 1])
        attention_sum, attention_count = attention_sum + layer_sum, attention_count + layer_count
    time_sum, time_count = (time_terms(lens, grid.cells, grid.rows["video"], time)
                            if time is not None and "video" in grid.rows else (answer_sum.new_zeros(()), 0))
    motion_sums, motion_counts = answer_sum.new_zeros(2), torch.zeros(2, dtype=torch.long, device=answer_sum.device)
    if motion is not None and "video" in grid.rows:
        steps = grid.per_row({"video": labels["video"][..., MOTION_COLUMN]}, fill=-1)
        motion_sums, motion_counts = motion_terms(lens, grid.cells, steps, motion)
    appearance_sums = answer_sum.new_zeros(len(APPEARANCE_WORDS))
    appearance_counts = torch.zeros(len(APPEARANCE_WORDS), dtype=torch.long, device=answer_sum.device)
    if appearance is not None and "video" in grid.rows:
        runs = grid.per_row({"video": labels["video"][..., APPEARANCE_COLUMN]}, fill=-1)
        read = lens if appearance_layer == RELEVANCE_LAYER else layer_logits(model, outputs.hidden_states,
                                                                             appearance_layer)
        appearance_sums, appearance_counts = appearance_terms(read, grid.cells, runs, appearance)
    return DenseParts(answer_sum, answer_count, probe, relevance_sums, relevance_counts, attention_sum,
                      attention_count, time_sum, time_count, motion_sums, motion_counts, appearance_sums,
                      appearance_counts, grid.tokens)


def pool(parts: Sequence[DenseParts], attention_weight: float, time_weight: float = 0.0, motion_weight: float = 0.0,
         appearance_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(answer loss, dense loss, terms)`` of the whole batch from its sub-batches' :class:`DenseParts`.

    The answer loss is the mean over all answer tokens (as the stock models' ``loss``); the dense loss is the
    probes' losses plus the class-balanced relevance loss over all media tokens plus ``attention_weight``
    times the attention loss's mean over all rows with key tokens plus ``time_weight`` times the time
    read-out's mean over all video tokens plus ``motion_weight`` times the motion read-out's class-balanced
    mean over all object tokens (still and moved weigh alike) plus ``appearance_weight`` times the appearance
    read-out's class-balanced mean over all object tokens. ``terms`` holds the unweighted dense terms, for the
    log.
    """
    answer = sum(p.answer_sum for p in parts) / max(1, sum(p.answer_count for p in parts))
    probe = sum(p.probe for p in parts)
    relevance = balanced_mean(sum(p.relevance_sums for p in parts), sum(p.relevance_counts for p in parts))
    rows = sum(p.attention_count for p in parts)
    attention = sum(p.attention_sum for p in parts) / rows if rows else parts[0].attention_sum
    dense = probe + relevance + attention_weight * attention
    terms = {"probe": float(probe.detach()), "relevance": float(relevance.detach()),
             "attention": float(attention.detach())}
    videos = sum(p.time_count for p in parts)
    if time_weight and videos:
        timing = sum(p.time_sum for p in parts) / videos
        dense = dense + time_weight * timing
        terms["time"] = float(timing.detach())
    counts = sum(p.motion_counts for p in parts)
    if motion_weight and bool((counts > 0).any()):
        steps = balanced_mean(sum(p.motion_sums for p in parts), counts)
        dense = dense + motion_weight * steps
        terms["motion"] = float(steps.detach())
    shown = sum(p.appearance_counts for p in parts)
    if appearance_weight and bool((shown > 0).any()):
        runs = balanced_mean(sum(p.appearance_sums for p in parts), shown)
        dense = dense + appearance_weight * runs
        terms["appearance"] = float(runs.detach())
    return answer, dense, terms
