"""An easy-first curriculum for training a testbed model from scratch: few background tokens first.

A language model trained from scratch must discover which of an image's 256 tokens a question is about;
with all of them in the sequence the gradient toward attending to the right token is diluted 256-fold and
the model first settles on answering from the question alone (three CPU runs of issue #4 stayed at chance
for hundreds of steps). Early in training we therefore drop most *background* tokens (cells with no object,
label or box outline, known exactly from the scene; see :mod:`mmtok.testbed.dense`): every content token
stays, and the kept share of background cells grows linearly from ``start`` to 1 over the first ``ramp``
share of the steps; after that the model trains on whole images. Kept tokens keep their original positions
(``position_ids``), as a pre-LLM compressor's tokens do at inference, so nothing changes when the ramp ends.
This is the "easy examples first" schedule of curriculum learning (Bengio et al., ICML 2009, Sec. 2) applied
to the sequence: the task is unchanged, only the distractors are phased in.
"""

from __future__ import annotations

from typing import Any

import torch

from mmtok.testbed.models import IGNORE


def background_share(step: int, steps: int, ramp: float, start: float = 0.0) -> float:
    """Share of background cells kept at ``step``: ``start`` rising linearly to 1 over ``ramp * steps`` steps.

    Raises:
        ValueError: ``ramp`` or ``start`` outside ``[0, 1]``.
    """
    if not 0.0 <= ramp <= 1.0 or not 0.0 <= start <= 1.0:
        raise ValueError(f"ramp and start must be in [0, 1], got {ramp} and {start}")
    end = ramp * steps
    if end <= 0 or step >= end:
        return 1.0
    return start + (1.0 - start) * step / end


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[n_images, N, hidden]``: the projected visual tokens exactly as the stock forward computes them."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def reduced_inputs(model: Any, batch: dict[str, torch.Tensor], features: torch.Tensor, keep_visual: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The language model's inputs with only the kept visual tokens, at their original positions.

    Args:
        model: a Llava testbed model.
        batch: ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, L]`` (one image per row).
        features: ``[B, N, hidden]`` projected visual tokens (gradients flow back to the vision tower).
        keep_visual: ``[B, N]`` bool, the visual tokens to keep.

    Returns:
        ``inputs_embeds`` ``[B, L', hidden]``, ``attention_mask``, ``position_ids``, ``labels`` ``[B, L']``,
        right-padded to the longest kept row, and ``visual_cells`` ``[B, L']`` (the grid cell of each kept
        visual token, -1 elsewhere; pop it before the forward pass).

    Raises:
        ValueError: a row's placeholder count differs from ``N``.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    image = ids == model.config.image_token_id
    n = features.shape[1]
    if (image.sum(1) != n).any():
        raise ValueError(f"every row must hold exactly {n} image placeholders, got {image.sum(1).tolist()}")
    embeds = model.get_input_embeddings()(ids.masked_fill(image, 0))
    embeds = embeds.masked_scatter(image.unsqueeze(-1), features.to(embeds.dtype))
    keep = mask.clone()
    keep[image] = keep_visual.reshape(-1) & keep[image]
    rows = [keep[b].nonzero().squeeze(1) for b in range(ids.shape[0])]
    length = max(len(r) for r in rows)
    out_e = embeds.new_zeros(ids.shape[0], length, embeds.shape[-1])
    out_m = torch.zeros(ids.shape[0], length, dtype=batch["attention_mask"].dtype, device=ids.device)
    out_p = torch.zeros(ids.shape[0], length, dtype=torch.long, device=ids.device)
    out_l = torch.full((ids.shape[0], length), IGNORE, dtype=labels.dtype, device=ids.device)
    out_c = torch.full((ids.shape[0], length), -1, dtype=torch.long, device=ids.device)
    cell_of = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    cell_of[image] = torch.arange(n, device=ids.device).repeat(ids.shape[0])
    for b, r in enumerate(rows):
        out_e[b, :len(r)] = embeds[b, r]
        out_m[b, :len(r)] = 1
        out_p[b, :len(r)] = r
        out_l[b, :len(r)] = labels[b, r]
        out_c[b, :len(r)] = cell_of[b, r]
    return {"inputs_embeds": out_e, "attention_mask": out_m, "position_ids": out_p, "labels": out_l,
            "visual_cells": out_c}


def keep_mask(dense_labels: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``[B, N]`` bool: every content cell, and each background cell with probability ``share``.

    Args:
        dense_labels: ``[B, N, >= 2]`` cell targets (:func:`mmtok.testbed.dense.batch_labels`; colour and shape first); a cell is content
            when its colour or shape class is not "none".
        share: probability of keeping a background cell.
        generator: a seeded CPU generator (the draw is a pure function of the run's seed and step).
    """
    content = (dense_labels[..., 0] > 0) | (dense_labels[..., 1] > 0)
    draw = torch.rand(content.shape, generator=generator) < share
    return content | draw.to(content.device)
