"""Attention rows of one vision layer, recomputed from that layer's input under any attention kernel.

Methods such as VisionZip, FasterVLM and HiPrune rank tokens by the attention the CLS token (or, in towers
without one, the average query) pays them at a chosen layer. Switching the whole tower to eager attention
to read those weights would cost every layer its fast kernel; instead a forward pre-hook on the chosen
attention module takes its input and recomputes ``softmax(q k^T / sqrt(d))`` for the rows needed. The
hooks live only inside :func:`capture`, which removes them in ``finally``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_QUERY_CHUNK = 1024


@contextlib.contextmanager
def capture(hooks: dict[str, tuple[nn.Module, Callable[..., torch.Tensor]]]) -> Iterator[dict[str, Any]]:
    """Run pre-hooks that compute a signal from a module's inputs; results land in the yielded dict.

    Args:
        hooks: ``{name: (module, fn)}``; ``fn(module, args, kwargs)`` returns the signal.

    Yields:
        A dict that maps each name to its signal once the module has run (a list when it runs twice).
    """
    found: dict[str, Any] = {}
    handles = []

    def make(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                found.setdefault(name, []).append(fn(module, args, kwargs))

        return hook

    try:
        for name, (module, fn) in hooks.items():
            handles.append(module.register_forward_pre_hook(make(name, fn), with_kwargs=True))
        yield found
    finally:
        for h in handles:
            h.remove()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def clip_attention_row(first_is_cls: bool, drop_first: bool) -> Callable[..., torch.Tensor]:
    """A hook function for CLIP / SigLIP style attention (``q_proj``, ``k_proj``, ``[B, S, C]`` input).

    Args:
        first_is_cls: the first token is a CLS token: return its attention row; otherwise return the
            mean attention row over all queries.
        drop_first: drop the first key from the result (the features exclude the CLS token).

    Returns:
        ``fn(module, args, kwargs) -> [B, S']`` float32 attention received by each key, averaged over
        heads (each row sums to 1 before ``drop_first``).
    """

    def fn(attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        h = _hidden(args, kwargs)
        b, s, _ = h.shape
        heads = int(getattr(attn, "num_heads", getattr(attn, "num_attention_heads", 1)))
        q = attn.q_proj(h).float().view(b, s, heads, -1).transpose(1, 2)
        k = attn.k_proj(h).float().view(b, s, heads, -1).transpose(1, 2)
        scale = float(getattr(attn, "scale", getattr(attn, "scaling", q.shape[-1] ** -0.5)))
        if first_is_cls:
            row = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, dim=-1)[:, :, 0].mean(1)
        else:
            row = _mean_rows(q, k, scale)
        return row[:, 1:] if drop_first else row

    return fn


def _mean_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[..., H, S, d]`` queries and keys -> ``[..., S]`` attention each key receives, mean over heads and queries."""
    total = torch.zeros(*k.shape[:-3], k.shape[-2], dtype=torch.float32, device=k.device)
    for start in range(0, q.shape[-2], _QUERY_CHUNK):
        p = torch.softmax(q[..., start : start + _QUERY_CHUNK, :] @ k.transpose(-1, -2) * scale, dim=-1)
        total += p.sum(dim=(-3, -2))
    return total / (q.shape[-3] * q.shape[-2])


def qwen_attention_row(attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Hook function for Qwen2-VL / Qwen2.5-VL vision attention (packed ``[S, C]`` input, ``cu_seqlens``).

    Returns:
        ``[S]`` float32: per patch, the attention it receives averaged over heads and over the queries
        of its own attention block (its image, or its window in Qwen2.5-VL's windowed layers), in the
        layer's token order.
    """
    h = _hidden(args, kwargs)
    cu = kwargs["cu_seqlens"].tolist()
    cos, sin = kwargs["position_embeddings"]
    s = h.shape[0]
    q, k, _ = attn.qkv(h).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = rope(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)
    out = torch.zeros(s, dtype=torch.float32, device=h.device)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        if b > a:
            out[a:b] = _mean_rows(q[:, a:b], k[:, a:b], float(attn.scaling))
    return out
