"""Per-layer tensor work of the ``llm`` stage: attention rows, the shortened sequence and the KV cache.

The hooks of :mod:`mmtok.adapters.llm_stage` call these stateless functions at a decoder layer:

* :func:`attention_rows` recomputes the few attention rows a compressor needs with the layer's own
  q projection, norms, rotary embedding and scaling (the model's attention kernel is left alone);
* :func:`left_padded_index` and :func:`shortened_kwargs` give the drop layer and the later ones a shorter,
  left-padded sequence: the gather index, its mask, the gathered positions and rotary tables and a causal
  mask from transformers' ``create_causal_mask``;
* :func:`trim_kv_cache` cuts every layer's KV cache after the prefill to the final kept positions.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def attention_rows(
    attn: nn.Module,
    x: torch.Tensor,
    keys: torch.Tensor,
    pos: tuple[torch.Tensor, ...],
    queries: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``[B, Q, L]`` float32 softmax attention of the ``[B, Q]`` query slots, causal, averaged over heads.

    ``x`` is the layer's normalised input ``[B, L, D]``, ``keys`` its pre-RoPE keys ``[B, L, Hkv, d]``,
    ``pos`` its ``(cos, sin)`` (``[B or 1, L, d]``), ``valid`` ``[B, L]`` the real tokens; the module's own
    ``q_proj``, ``q_norm``, ``apply_rotary_pos_emb`` and ``scaling`` are used, as its forward does.

    Raises:
        ValueError: if the attention module's Python module has no ``apply_rotary_pos_emb``.
    """
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"{type(attn).__name__}: no apply_rotary_pos_emb in its module; unsupported")
    b, length, dim = x.shape
    q_len, hd = queries.shape[1], keys.shape[-1]
    cos, sin = (t.expand(b, *t.shape[1:]) for t in pos)
    q = attn.q_proj(x.gather(1, queries[..., None].expand(-1, -1, dim))).view(b, q_len, -1, hd)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    at = queries[..., None].expand(-1, -1, cos.shape[-1])
    q = rope(q.transpose(1, 2), q.transpose(1, 2), cos.gather(1, at), sin.gather(1, at))[0]
    k = rope(keys.transpose(1, 2), keys.transpose(1, 2), cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = float(getattr(attn, "scaling", hd**-0.5))
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    slots = torch.arange(length, device=x.device)
    allowed = valid[:, None, None, :] & (slots[None, None, None, :] <= queries[:, None, :, None])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(1)


def left_padded_index(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather index and mask of a left-padded batch of kept slots.

    Args:
        rows: per row, the sorted ``[n_b]`` slots kept in the current sequence (``n_b >= 1``).
        device: where the index and mask go.

    Returns:
        ``(g, mask)``: ``g`` ``[B, L_new]`` long, each row's slots right-aligned and its padding filled
        with the row's first slot; ``mask`` ``[B, L_new]`` bool, True on the kept slots
        (``L_new = max n_b``).
    """
    new_len = max(r.numel() for r in rows)
    g = torch.zeros(len(rows), new_len, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), new_len, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        g[b, new_len - r.numel():], g[b, : new_len - r.numel()] = r, r[0]
        mask[b, new_len - r.numel():] = True
    return g, mask


def shortened_kwargs(
    config: Any, kwargs: dict, h: torch.Tensor, g: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    """The layer kwargs for the shortened sequence: causal mask, gathered positions and rotary tables.

    Args:
        config: the decoder stack's config (for ``create_causal_mask``).
        kwargs: the layer's kwargs for the previous sequence (``position_embeddings``, ``position_ids``).
        h: ``[B, L_new, D]`` the shortened hidden states.
        g: ``[B, L_new]`` the gather index into the previous sequence.
        mask: ``[B, L_new]`` bool, the real tokens of the shortened sequence.

    Returns:
        ``{"attention_mask", "position_embeddings", "position_ids"}`` for the shortened sequence
        (``position_ids`` gathered when it is a ``[B, L]`` or ``[3 or 4, B, L]`` tensor, else as given).
    """
    from transformers.masking_utils import create_causal_mask

    b = g.shape[0]
    cos, sin = kwargs["position_embeddings"]
    gathered = tuple(t.expand(b, *t.shape[1:]).gather(1, g[..., None].expand(-1, -1, t.shape[-1]))
                     for t in (cos, sin))
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.dim() in (2, 3):
        lead = pid.shape[:-2]
        pid = pid.expand(*lead, b, pid.shape[-1]).gather(-1, g.expand(*lead, *g.shape))
    causal = create_causal_mask(config=config, inputs_embeds=h, attention_mask=mask, past_key_values=None,
                                position_ids=None)
    return {"attention_mask": causal, "position_embeddings": gathered, "position_ids": pid}


def trim_kv_cache(cache: Any, drops: list[tuple[int, torch.Tensor]], mask: torch.Tensor, length: int) -> int:
    """Cut every layer's KV cache to the final kept positions (one length for all layers).

    A layer before the first drop holds all ``length`` prompt positions, one after drop ``j`` the
    positions of that drop's sequence; each is gathered down to the final sequence (a merged token keeps
    its representative's entries below the merge).

    Args:
        cache: the prefilled ``DynamicCache``; its ``layers`` hold ``keys`` / ``values`` ``[B, H, L_i, d]``.
        drops: ``[(drop layer, g), ...]`` in layer order, ``g`` ``[B, L_new]`` the slots each drop kept in
            the sequence before it.
        mask: ``[B, L_final]`` the real tokens of the final sequence.
        length: the prompt length before any drop.

    Returns:
        The cache's sequence length after the cut.

    Raises:
        ValueError: if a cache layer is not a tensor cache of that layer's whole sequence.
    """
    final = mask.shape[1]
    maps = [torch.arange(final, device=mask.device).expand(mask.shape[0], -1)]
    for _, g in reversed(drops):
        maps.insert(0, g.gather(1, maps[0].to(g.device)))
    bounds = [d for d, _ in drops]
    lengths = [length] + [g.shape[1] for _, g in drops]
    for i, cache_layer in enumerate(cache.layers):
        s = sum(d <= i for d in bounds)
        idx = maps[s]
        keys, values = getattr(cache_layer, "keys", None), getattr(cache_layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) \
                or keys.shape[-2] != lengths[s]:
            raise ValueError(f"the llm stage needs a DynamicCache of every prompt token; cache layer {i} "
                             f"is a {type(cache_layer).__name__} of {getattr(keys, 'shape', None)}")
        if s == len(drops):
            continue
        gi = idx.to(keys.device)[:, None, :, None]
        cache_layer.keys = keys.gather(2, gi.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        cache_layer.values = values.gather(2, gi.expand(-1, values.shape[1], -1, values.shape[-1]))
    return cache.get_seq_length()
