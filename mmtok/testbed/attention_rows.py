"""One head's attention probabilities at a few query positions, while the model runs SDPA.

The attention supervision (:func:`mmtok.testbed.dense.attention_loss`) reads one head of one language-model
layer at the positions that predict the answer words: a handful of rows per item. The stock way to get them,
``output_attentions=True``, needs eager attention in every layer, which materialises every head's
``[L, L]`` map: for ``testbed-qwen2vl``'s video rows (1,180 tokens, batch 16) that made the language model's
forward pass six times slower than SDPA on the CPU. Here the model runs SDPA throughout, through an attention
function registered with transformers' ``AttentionInterface`` (its documented extension point, nothing
patched); in the one supervised layer it also computes ``softmax(q k^T * scale + mask)`` for the requested
query rows of the requested head, differentiably, from the same rotated queries and keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPLEMENTATION = "mmtok_query_rows"
_RECORDER = "_mmtok_query_rows"


@dataclass
class QueryRows:
    """Attention probabilities of selected query positions of one head.

    Attributes:
        positions: ``[B, R]`` long, the query positions of each row (-1: padding, its probabilities are 0).
        probs: ``[B, R, L]`` float, the attention probabilities over the keys at those positions.
    """

    positions: torch.Tensor
    probs: torch.Tensor | None = None

    def at(self, b: int, position: int) -> torch.Tensor:
        """``[L]`` the probabilities of batch row ``b`` at query ``position``.

        Raises:
            ValueError: nothing was recorded, or ``position`` was not requested for row ``b``.
        """
        if self.probs is None:
            raise ValueError("no attention was recorded: run the forward pass inside query_rows()")
        hit = (self.positions[b] == position).nonzero()
        if len(hit) == 0:
            raise ValueError(f"query position {position} of row {b} was not recorded "
                             f"(recorded: {self.positions[b].tolist()})")
        return self.probs[b, int(hit[0, 0])]

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None, head: int) -> None:
        """Compute :attr:`probs` from one layer's rotated ``[B, H, L, d]`` queries and ``[B, H_kv, L, d]`` keys."""
        groups = query.shape[1] // key.shape[1]
        pos = self.positions.clamp_min(0)
        q = query[:, head].gather(1, pos[..., None].expand(-1, -1, query.shape[-1]))  # [B, R, d]
        k = key[:, head // groups]  # [B, L, d]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = (q.float() @ k.float().transpose(1, 2)) * scale  # [B, R, L]
        keys = torch.arange(k.shape[1], device=k.device)
        if mask is None:  # SDPA ran with is_causal: no padding
            allowed = keys[None, None] <= pos[..., None]
        else:
            rows = mask[:, 0].gather(1, pos[..., None].expand(-1, -1, mask.shape[-1]))
            if rows.dtype == torch.bool:
                allowed = rows
            else:  # an additive mask: 0 where allowed, the dtype's minimum elsewhere
                allowed = rows > torch.finfo(rows.dtype).min / 2
                scores = scores + rows.float().where(allowed, 0.0)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        self.probs = probs * (self.positions >= 0)[..., None]


def _query_rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder = getattr(module, _RECORDER, None)
    if recorder is not None:
        rows, head = recorder
        rows.record(module, query, key, attention_mask, kwargs.get("scaling"), head)
    return out


AttentionInterface.register(IMPLEMENTATION, _query_rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def answer_query_positions(labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """``[B, R]`` the positions that predict each answer word (the one before it), -1 padded.

    Args:
        labels: ``[B, L]`` answer labels, ``ignore`` off the answer.
        ignore: the label value off the answer.
    """
    answer = labels != ignore
    answer[:, 0] = False  # position 0 predicts nothing
    counts = answer.sum(1)
    width = max(int(counts.max()) if len(counts) else 0, 1)
    out = torch.full((labels.shape[0], width), -1, dtype=torch.long, device=labels.device)
    for b in range(labels.shape[0]):
        at = answer[b].nonzero()[:, 0] - 1
        out[b, :len(at)] = at
    return out


@contextmanager
def query_rows(model: Any, layer: int, positions: torch.Tensor, head: int = 0) -> Iterator[QueryRows]:
    """Record head ``head`` of language-model layer ``layer`` at ``positions`` during the forward passes inside.

    The language model runs SDPA (through :data:`IMPLEMENTATION`) inside the block and gets its previous
    attention implementation back after it.

    Args:
        model: a testbed (Llava, Qwen2-VL or Qwen2-Audio) model; its ``model.language_model`` is used.
        layer: the decoder layer index.
        positions: ``[B, R]`` long query positions per batch row, -1 for none (see
            :func:`answer_query_positions`).
        head: the query head.

    Yields:
        A :class:`QueryRows` whose ``probs`` the forward pass fills.

    Raises:
        ValueError: ``layer`` or ``head`` out of range.
    """
    lm = model.model.language_model
    layers = lm.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the language model has {len(layers)} layers")
    attn = layers[layer].self_attn
    heads = lm.config.num_attention_heads
    if not 0 <= head < heads:
        raise ValueError(f"head {head} out of range: layer {layer} has {heads} heads")
    rows = QueryRows(positions)
    before = lm.config._attn_implementation
    lm.set_attn_implementation(IMPLEMENTATION)
    setattr(attn, _RECORDER, (rows, head))
    try:
        yield rows
    finally:
        delattr(attn, _RECORDER)
        lm.set_attn_implementation(before)
