"""Start one testbed's language model from another's: the layers as they are, the embeddings word by word.

Real VLMs never train their language model from scratch: LLaVA starts from Vicuna, Qwen2-VL from Qwen2.
A testbed model trained from scratch spends most of its first stage learning to read its media at all
(issue #4: ``media_gain`` stayed at 0 for thousands of steps). Every testbed has the same closed,
word-level vocabulary for its shared words and the same Llama-style decoder (Qwen2's only adds q/k/v
biases, which start at 0 here so the copy computes what the source did), so a new testbed can take its
language model from a trained one, e.g. ``testbed-qwen2vl`` from ``testbed-llava``, and its vision tower then
only has to produce tokens that model already reads (the dense probe aligns them with the same word
embeddings). Text positions agree too: Qwen2-VL's M-RoPE gives a text token the same index on all three
axes, which is the 1-D rotary code of Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PREFIX = "model.language_model."
EMBEDDINGS = PREFIX + "embed_tokens.weight"


def read_source(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The weights (as the loaded model names them) and vocabulary of an exported testbed directory.

    Loaded through :func:`mmtok.load`, the path of every checkpoint: the files store some models' keys in
    an older layout that ``from_pretrained`` converts.

    Raises:
        ValueError: the directory is not a saved model (the message of :func:`mmtok.load`).
    """
    from mmtok.loading import load

    model, processor = load(Path(source), dtype=torch.float32)
    tokenizer = getattr(processor, "tokenizer", processor)
    return model.state_dict(), tokenizer.get_vocab()


@torch.no_grad()
def transfer_language_model(model: Any, tokenizer: Any, source: str | Path) -> dict[str, int]:
    """Copy the language model of the exported testbed at ``source`` into ``model``, in place.

    Every decoder weight (``model.language_model.*``) is copied; a bias the source lacks (Qwen2's q/k/v
    biases from a Llama source) is set to 0. The input embedding rows of the words both tokenizers have are
    copied; the others (``model``'s own media placeholders and words) keep their initialisation. Output
    embeddings must be tied to the input ones (all testbeds are).

    Args:
        model: the target testbed model (Llava, Qwen2-VL or Qwen2-Audio).
        tokenizer: its tokenizer.
        source: an exported testbed directory.

    Returns:
        ``{"tensors": decoder tensors copied, "zeroed": biases set to 0, "words": embedding rows copied,
        "new_words": rows left as initialised}``.

    Raises:
        ValueError: untied embeddings, or a decoder whose shapes differ from the source's (the message names
            the first tensor).
    """
    out_rows = model.get_output_embeddings().weight
    if out_rows.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise ValueError("transfer_language_model needs tied input / output embeddings")
    weights, source_vocab = read_source(source)
    state = model.state_dict()
    copied = zeroed = 0
    for key, target in state.items():
        if not key.startswith(PREFIX) or key == EMBEDDINGS:
            continue
        if key not in weights:
            if key.endswith(".bias"):
                target.zero_()
                zeroed += 1
                continue
            raise ValueError(f"the source model at {source} has no {key}: its language model differs")
        if weights[key].shape != target.shape:
            raise ValueError(f"{key} is {tuple(weights[key].shape)} in the source model at {source} but "
                             f"{tuple(target.shape)} here: the two language models must have the same shape")
        target.copy_(weights[key].to(target.dtype))
        copied += 1
    source_rows = weights[EMBEDDINGS]
    rows = state[EMBEDDINGS]
    if source_rows.shape[1] != rows.shape[1]:
        raise ValueError(f"the source embeddings are {source_rows.shape[1]} wide, these {rows.shape[1]}")
    words = 0
    vocab = tokenizer.get_vocab()
    for word, i in vocab.items():
        j = source_vocab.get(word)
        if j is not None:
            rows[i] = source_rows[j].to(rows.dtype)
            words += 1
    return {"tensors": copied, "zeroed": zeroed, "words": words, "new_words": len(vocab) - words}
