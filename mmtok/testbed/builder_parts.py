"""Pieces every testbed builder shares: the word-level tokenizer, the seeded initialisation, CLIP's statistics.

Kept apart from :mod:`mmtok.testbed.models` so the builders in :mod:`mmtok.testbed.qwen_builders` can use
them without importing the module that imports them (both re-exported from :mod:`mmtok.testbed.models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_WORDS = ("USER", "ASSISTANT", ":")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def word_tokenizer(words: Sequence[str], extra_specials: Sequence[str], **named: Any) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (split like :func:`mmtok.testbed.data.items.words`).

    Every word of the testbed vocabulary is one token, so a held-out answer is a short, exact token
    sequence; decoding joins words with single spaces, which is how the generator writes answers.

    Args:
        words: the vocabulary (e.g. :func:`mmtok.testbed.data.vocabulary` plus the chat words).
        extra_specials: special tokens after ``<unk> <s> </s> <pad>`` (e.g. ``"<image>"``).
        **named: passed to ``PreTrainedTokenizerFast`` (``extra_special_tokens`` ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIALS, *extra_specials]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(extra_specials), **named,
    )


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise in a fixed order from ``seed`` (independent of any global RNG use before)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
