"""Where an AnyRes image's (or a pooled video's) tokens sit in the sequence a LLaVA-NeXT-style model fills.

LLaVA-NeXT and LLaVA-OneVision pack an image as ``[thumbnail] [crop-grid row 0, newline] [row 1, newline]
...``; a compressor sees the feature tokens crop by crop instead (see :mod:`mmtok.adapters.llava_next`).
A :class:`Layout` maps between the two orders; :func:`read_layout` builds one from the model's own
``pack_image_features`` run on token coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmtok.adapters.base import Encoded

FLAG, Y, X = 0, 1, 2  # the coordinate channels packed alongside the signals; FLAG is -1 on newline tokens


@dataclass
class Layout:
    """Where one item's tokens sit in the placeholder sequence the model fills.

    Attributes:
        length: ``L``: placeholders the item fills (feature tokens and newline tokens).
        order: ``[m]`` long: the packed index of each token a compressor sees, in crop order.
        newline: ``[R]`` long: packed indices of the ``image_newline`` tokens (always kept).
        segments: token count of each non-empty segment of ``order`` (thumbnail, then crops; or frames).
        crop_of: ``[m]`` long: the view each token of ``order`` comes from: 0 for the thumbnail, ``1 + r *
            cols + c`` for crop ``(r, c)`` (or the frame number of a video token).
        source: ``[m]`` long: each token's index in the model's pre-packing ``[patches * h * w]`` crop
            tokens, or None when the model interpolates the packed grid (tokens are then mixtures).
        grid: ``(H, W)`` or ``(T, H, W)`` when the tokens of ``order`` form one grid, else None.
        crops: ``(rows, cols)`` of the high-resolution crop grid, or None for a single view.
        channels: ``[m, 3 + c]`` float64, in ``order``: each token's packed ``(flag, y, x)`` coordinates
            in the full crop grid, then the ``c`` signals packed along with them.
    """

    length: int
    order: torch.Tensor
    newline: torch.Tensor
    segments: list[int]
    crop_of: torch.Tensor
    source: torch.Tensor | None = None
    grid: tuple[int, ...] | None = None
    crops: tuple[int, int] | None = None
    channels: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """``m``: tokens a compressor sees."""
        return int(self.order.numel())

    def packed_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """``[k + R]`` ascending packed indices kept for compressor-order kept indices ``keep`` ``[k]``."""
        return torch.sort(torch.cat([self.order[keep.cpu()], self.newline])).values

    def pack(self, keep: torch.Tensor, kept: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The ``[k + R, D]`` features the LLM sees, in packed order.

        Args:
            keep: ``[k]`` ascending compressor-order indices kept.
            kept: ``[k, D]`` their (projected, possibly merged) features.
            packed: ``[L, D]`` the model's own packed features, whose newline rows are reused.
        """
        index = torch.cat([self.order[keep.cpu()], self.newline])
        feats = torch.cat([kept, packed[self.newline.to(packed.device)].to(kept.dtype)])
        return feats[torch.argsort(index).to(feats.device)]


@dataclass
class AnyResEncoded(Encoded):
    """:class:`Encoded` whose ``features`` / ``vision`` / ``signals`` are in compressor (crop) order.

    Attributes:
        layouts: per item, its :class:`Layout`.
        packed: per item, the ``[L, D]`` features the model's own encoder produced, newlines included.
    """

    layouts: list[Layout] = field(default_factory=list)
    packed: list[torch.Tensor] = field(default_factory=list)


def expand_placeholders(texts: list[str], mark: str, counts: list[int]) -> list[str]:
    """Repeat the ``j``-th ``mark`` (counting across the prompts in order) ``counts[j]`` times.

    Raises:
        ValueError: the prompts hold a different number of ``mark`` than ``counts`` has entries.
    """
    out, j = [], 0
    for text in texts:
        parts = text.split(mark)
        if j + len(parts) - 1 > len(counts):
            break
        pieces = [parts[0]]
        for part in parts[1:]:
            pieces.append(mark * counts[j] + part)
            j += 1
        out.append("".join(pieces))
    if j != len(counts) or len(out) != len(texts):
        raise ValueError(f"the prompts hold a different number of {mark!r} than the {len(counts)} items given")
    return out


def read_layout(packed: torch.Tensor, side: int, crops: tuple[int, int] | None) -> Layout:
    """Read one packed coordinate tensor ``[L, 3 + c]`` into a :class:`Layout`."""
    is_newline = packed[:, FLAG] < 0
    newline = is_newline.nonzero().squeeze(1)
    tokens = (~is_newline).nonzero().squeeze(1)
    t = side * side
    y, x = packed[tokens, Y], packed[tokens, X]
    if crops is None:
        crop = torch.zeros(tokens.numel(), dtype=torch.long)
        grid: tuple[int, ...] | None = (side, side) if tokens.numel() == t else None
    else:
        rows, cols = crops
        r = (y.round().long() // side).clamp(0, rows - 1)
        c = (x.round().long() // side).clamp(0, cols - 1)
        crop = 1 + r * cols + c
        crop[:t] = 0  # the thumbnail comes first, unchanged
        grid = None
    perm = torch.argsort(crop, stable=True)
    order, crop = tokens[perm], crop[perm]
    y, x = y[perm], x[perm]
    source = None
    exact = bool(((y - y.round()).abs() < 1e-6).all() and ((x - x.round()).abs() < 1e-6).all())
    if exact:
        yi, xi = y.round().long(), x.round().long()
        src = crop * t + (yi % side) * side + (xi % side)
        if int(torch.unique(src).numel()) == src.numel():
            source = src
    counts = torch.bincount(crop)
    return Layout(
        length=int(packed.shape[0]),
        order=order,
        newline=newline,
        segments=[int(v) for v in counts[counts > 0]],
        crop_of=crop,
        source=source,
        grid=grid,
        crops=crops,
        channels=packed[order],
    )
