"""Shared fixtures: token batches with every signal a compressor may require."""

from __future__ import annotations

import os

import pytest
import torch

import mmtok

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton only runs on a CPU through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's models and tensors are tiny: one thread avoids thread start-up costs that dominate on 2 cores.
torch.set_num_threads(1)


def make_tokens(
    b: int = 2,
    h: int = 6,
    w: int = 6,
    c: int = 16,
    *,
    t: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lengths: list[int] | None = None,
    text_len: int = 5,
) -> mmtok.VisualTokens:
    """A batch with features, grid, CLS attention, mid-layer attention and text, all random but seeded.

    With ``lengths``, rows are ragged; each row's grid is then square (``lengths`` must be squares)
    or omitted when a length is not a square.
    """
    g = torch.Generator().manual_seed(seed)
    n = (t or 1) * h * w
    feats = torch.randn(b, n, c, generator=g)
    attn = torch.rand(b, n, generator=g).softmax(-1)
    mid = torch.rand(b, n, generator=g).softmax(-1)
    text = torch.randn(b, text_len, c, generator=g)
    text_attn = torch.rand(b, n, generator=g).softmax(-1)
    text_attn_all = torch.rand(b, n, text_len, generator=g).softmax(1)
    mask = None
    grid = (t, h, w) if t else (h, w)
    if lengths is not None:
        mask = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        sides = [round(length**0.5) for length in lengths]
        grid = (
            [(s, s) for s in sides]
            if all(s * s == ln for s, ln in zip(sides, lengths, strict=True))
            else None
        )
    return mmtok.VisualTokens(
        feats.to(dtype),
        grid=grid,
        cls_attn=attn.to(dtype),
        text=text.to(dtype),
        mask=mask,
        signals={
            "mid_attn": mid.to(dtype),
            "text_attn": text_attn.to(dtype),
            "text_attn_all": text_attn_all.to(dtype),
        },
    )


@pytest.fixture
def tokens() -> mmtok.VisualTokens:
    return make_tokens()
