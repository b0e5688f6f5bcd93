"""What training measures of a testbed model: held-out accuracy under teacher forcing and media use.

Used by :mod:`mmtok.testbed.train` at every evaluation and by the export that scores a model card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mmtok.testbed.data import HELDOUT_SPLIT, families, item
from mmtok.testbed.models import IGNORE, TestbedSpec, encode_items

# The question form of training batches and held-out scoring: half short answer, half multiple choice.
FORM = "mixed"


def device_of(model: Any) -> torch.device:
    """Where ``model``'s parameters are."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def media_gain(model: Any, processor: Any, items: list[Any]) -> float:
    """Answer loss with each item's media swapped for another item's, minus the loss with its own media.

    About 0 while a model answers from the question alone (the first phase of training from scratch);
    it grows once the model reads its media. Swapping (a fixed cyclic shift among the items of each
    modality, so an image is swapped for an image and a video for a video) keeps the media statistics, so
    the gap measures use of the item's own content, not of media in general.

    Raises:
        ValueError: a modality with fewer than two items.
    """
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.modality, []).append(i)
    if not groups or min(len(g) for g in groups.values()) < 2:
        sizes = {m: len(g) for m, g in groups.items()}
        raise ValueError(f"media_gain needs at least two items of each modality to swap their media, got {sizes}")
    donor = {g[j]: g[j - 1] for g in groups.values() for j in range(len(g))}
    was_training = model.training
    model.eval()
    own = to_device(encode_items(processor, items), device_of(model))
    swapped = [replace(it, media=items[donor[i]].media) for i, it in enumerate(items)]
    swapped = to_device(encode_items(processor, swapped), device_of(model))
    gain = float(model(**swapped).loss) - float(model(**own).loss)
    model.train(was_training)
    return gain


def heldout_items(spec: TestbedSpec, n_per_family: int, seed: int = 0, form: str = FORM) -> list[Any]:
    """The first ``n_per_family`` held-out items of every family of the spec's modalities (fixed by ``seed``)."""
    out = []
    for modality in spec.modalities:
        for fam in families(modality):
            out += [item(modality, HELDOUT_SPLIT, i, seed, family=fam, form=form) for i in range(n_per_family)]
    return out


@torch.no_grad()
def heldout_accuracy(model: Any, processor: Any, items: list[Any], batch_size: int = 16,
                     forward: Callable[[dict[str, torch.Tensor], torch.Tensor],
                                       tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
    """Exact-match accuracy per family under teacher forcing.

    An item counts as right when the argmax at every answer position (the answer words and ``</s>``) is
    the target token: exactly the items that greedy decoding answers word for word, at the cost of one
    forward pass. :mod:`mmtok.testbed.evaluate` measures the same through ``generate()``.

    Args:
        model: a testbed model.
        processor: its processor.
        items: QA items (:func:`heldout_items`).
        batch_size: items per forward pass.
        forward: ``(batch, labels) -> (logits [B, L, V], targets [B, L])`` aligned for scoring; None: the
            model on the whole batch (``logits[:, :-1]`` against ``labels[:, 1:]``). A caller that changes
            what the model reads (:mod:`mmtok.testbed.audio_budget`) passes its own.

    Returns:
        ``{family: accuracy}`` plus ``"mean"`` (the mean over families).
    """
    was_training = model.training
    model.eval()
    right: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = to_device(encode_items(processor, chunk), device_of(model))
        labels = batch.pop("labels")
        if forward is None:
            logits, target = model(**batch).logits[:, :-1], labels[:, 1:]
        else:
            logits, target = forward(batch, labels)
        ok = ((logits.argmax(-1) == target) | (target == IGNORE)).all(1)
        for it, good in zip(chunk, ok.tolist(), strict=True):
            right.setdefault(it.family, []).append(bool(good))
    model.train(was_training)
    acc = {fam: sum(v) / len(v) for fam, v in right.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc
