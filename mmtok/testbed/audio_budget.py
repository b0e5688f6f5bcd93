"""Random pruning of a Qwen2-Audio testbed's audio tokens before its language model, scored by teacher forcing.

The issue's check that the testbed's tasks test token reduction ("random at 10 % must lose clearly") for the
audio testbed, while mmtok has no adapter for Qwen2-Audio (so ``compress_then_generate`` and the compressors do
not run on it): each item keeps a uniformly random ``round(budget * n)`` of its ``n`` audio tokens (at least
one) and drops the rest from the sequence the language model reads, as a pre-LLM pruner does; kept tokens keep
their position ids (the ones the full sequence gives them). Accuracy is the exact match of
:func:`mmtok.testbed.train_measures.heldout_accuracy` (every answer word and ``</s>`` the argmax), on the
reduced sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mmtok.testbed.train_measures import heldout_accuracy


def random_keep(input_ids: torch.Tensor, audio_token_id: int, budget: float, generator: torch.Generator) -> torch.Tensor:
    """Which positions stay: every text position and a random ``round(budget * n)`` of each row's audio ones.

    Args:
        input_ids: ``[B, T]`` token ids, the audio placeholders expanded (``n`` per row, the same for every row).
        audio_token_id: the placeholder id.
        budget: the share of audio tokens kept, in ``(0, 1]``.
        generator: draws the kept tokens.

    Returns:
        ``[B, T]`` bool, the same number of True per row.

    Raises:
        ValueError: a budget outside ``(0, 1]``, or rows with different numbers of audio tokens.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget is the share of audio tokens kept, in (0, 1], got {budget}")
    audio = input_ids == audio_token_id
    counts = audio.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every row must hold the same number of audio tokens, got {counts.tolist()}")
    n = int(counts[0])
    k = max(1, round(budget * n)) if n else 0
    keep = ~audio
    for row in range(input_ids.shape[0]):
        where = audio[row].nonzero().squeeze(1)
        chosen = where[torch.randperm(n, generator=generator)[:k]]
        keep[row, chosen.to(keep.device)] = True
    return keep


@contextlib.contextmanager
def _pruned_language_model(model: Any, keep: torch.Tensor) -> Iterator[None]:
    """While open, the language model reads only the ``keep`` positions of each row, at their own position ids."""
    rows = keep.shape[0]

    def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] != keep.shape[1]:
            raise ValueError(f"the language model reads {embeds.shape[1]} positions, the input ids have "
                             f"{keep.shape[1]}: the processor must expand each audio placeholder to one token per "
                             "audio feature")
        positions = torch.arange(embeds.shape[1], device=embeds.device).expand(rows, -1)
        kwargs["inputs_embeds"] = embeds[keep].view(rows, -1, embeds.shape[-1])
        kwargs["position_ids"] = positions[keep].view(rows, -1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][keep].view(rows, -1)
        return args, kwargs

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def random_budget_accuracy(model: Any, processor: Any, items: list[Any], budget: float, seed: int = 0,
                           batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced exact-match accuracy per family with a random ``budget`` of the audio tokens kept.

    Args:
        model: a ``Qwen2AudioForConditionalGeneration`` testbed model.
        processor: its processor.
        items: audio QA items (:func:`mmtok.testbed.train_measures.heldout_items`).
        budget: share of each item's audio tokens kept, in ``(0, 1]`` (1: every token, the card's accuracy).
        seed: seeds the draws.
        batch_size: items per forward pass.

    Returns:
        ``{family: accuracy}`` plus ``"mean"`` (the mean over families).

    Raises:
        ValueError: a model that is not Qwen2-Audio, a processor that does not expand the audio placeholders,
            or a bad budget (:func:`random_keep`).
    """
    if model.config.model_type != "qwen2_audio":
        raise ValueError(f"random_budget_accuracy prunes Qwen2-Audio's audio tokens, got {model.config.model_type!r}")
    generator = torch.Generator().manual_seed(seed)

    def pruned(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = random_keep(batch["input_ids"], model.config.audio_token_id, budget, generator).to(labels.device)
        with _pruned_language_model(model, keep):
            logits = model(**batch).logits[:, :-1]
        return logits, labels[keep].view(labels.shape[0], -1)[:, 1:]

    return heldout_accuracy(model, processor, items, batch_size, forward=pruned)
