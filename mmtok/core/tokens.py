"""The input of every compressor: visual (or audio) tokens and the signals a method may need."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Grid = tuple[int, ...]


def _check_float(name: str, t: torch.Tensor) -> None:
    if not torch.is_floating_point(t):
        raise TypeError(f"VisualTokens.{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"VisualTokens.{name} contains NaN or Inf values; clean the features first")


@dataclass
class VisualTokens:
    """A batch of tokens from one modality, with the signals compressors may ask for.

    Rows may hold different numbers of tokens: ``mask`` marks the valid ones, which must be a
    left-aligned prefix of each row (``mask[b] = [1, ..., 1, 0, ..., 0]``).

    Args:
        features: ``[B, N, C]`` token features (what the LLM will see after compression).
        grid: the spatial layout of a row's tokens: ``(H, W)`` for an image or ``(T, H, W)`` for a
            video, shared by every row; or a list with one such tuple per row for ragged batches.
            Required by grid-aware methods (``uniform``, ``pool``).
        cls_attn: ``[B, N]`` attention each token receives from the vision tower's CLS token (or the
            mean over queries for towers without a CLS token) at the chosen layer.
        text: ``[B, T, C]`` embeddings of the prompt's text tokens, in the same space as
            ``features`` (for text-aware methods such as ``cdpruner`` and ``coverage``).
        text_mask: ``[B, T]`` bool, valid text tokens (left-aligned); all valid when omitted.
        metric: ``[B, N, Cm]`` features used to measure similarity (e.g. attention keys); defaults to
            ``features``.
        sizes: ``[B, N]`` how many original tokens each token already stands for (after an earlier
            merge); defaults to ones.
        mask: ``[B, N]`` bool, valid tokens; all valid when omitted.
        segments: per row, the lengths of consecutive segments (frames, crops) that sum to the row's
            valid length; used by per-frame / per-crop budgets. Derived from a 3-D ``grid`` when
            omitted.
        signals: further named ``[B, N]`` or ``[B, N, *]`` signals (e.g. ``"mid_attn"``, the CLS
            attention at a middle vision layer, for ``hiprune``).
    """

    features: torch.Tensor
    grid: Grid | list[Grid] | None = None
    cls_attn: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    metric: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    segments: list[list[int]] | None = None
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.features
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"VisualTokens.features must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() == 2:
            self.features = f = f.unsqueeze(0)
            for name in ("cls_attn", "sizes", "mask", "text_mask"):
                v = getattr(self, name)
                if isinstance(v, torch.Tensor) and v.dim() == 1:
                    setattr(self, name, v.unsqueeze(0))
            for name in ("text", "metric"):
                v = getattr(self, name)
                if isinstance(v, torch.Tensor) and v.dim() == 2:
                    setattr(self, name, v.unsqueeze(0))
            self.signals = {k: v.unsqueeze(0) for k, v in self.signals.items()}
        if f.dim() != 3:
            raise ValueError(
                f"VisualTokens.features must have shape [B, N, C] (or [N, C]), got {tuple(f.shape)}"
            )
        b, n, c = f.shape
        if b == 0 or n == 0 or c == 0:
            raise ValueError(f"VisualTokens.features is empty: shape {tuple(f.shape)}; need B, N, C >= 1")
        _check_float("features", f)
        self._check_tensor("cls_attn", (b, n))
        self._check_tensor("sizes", (b, n))
        self._check_tensor("metric", (b, n, None))
        self._check_tensor("text", (b, None, None))
        if self.mask is not None:
            if self.mask.shape != (b, n):
                raise ValueError(f"VisualTokens.mask must have shape {(b, n)}, got {tuple(self.mask.shape)}")
            self.mask = self.mask.to(device=f.device, dtype=torch.bool)
            _check_prefix("mask", self.mask)
        if self.text is not None:
            if self.text_mask is not None:
                if self.text_mask.shape != self.text.shape[:2]:
                    raise ValueError(
                        f"VisualTokens.text_mask must have shape {tuple(self.text.shape[:2])}, "
                        f"got {tuple(self.text_mask.shape)}"
                    )
                self.text_mask = self.text_mask.to(device=f.device, dtype=torch.bool)
                _check_prefix("text_mask", self.text_mask)
            if self.text.shape[1] == 0:
                raise ValueError("VisualTokens.text has no tokens; pass text=None when there is no prompt")
        for k, v in self.signals.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape[:2]) != (b, n):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"VisualTokens.signals[{k!r}] must have shape [B={b}, N={n}, ...], got {shape}"
                )
            _check_float(f"signals[{k!r}]", v)
        if self.sizes is not None and bool((self.sizes <= 0).any()):
            raise ValueError("VisualTokens.sizes must be positive")
        self._check_grid()
        self._check_segments()

    def _check_tensor(self, name: str, shape: tuple[int | None, ...]) -> None:
        v = getattr(self, name)
        if v is None:
            return
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"VisualTokens.{name} must be a torch.Tensor, got {type(v).__name__}")
        ok = v.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, v.shape, strict=False))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"VisualTokens.{name} must have shape {want}, got {tuple(v.shape)}")
        _check_float(name, v)

    def _check_grid(self) -> None:
        if self.grid is None:
            return
        grids = self.grid if isinstance(self.grid, list) else [self.grid] * self.batch_size
        if len(grids) != self.batch_size:
            raise ValueError(f"VisualTokens.grid lists {len(grids)} grids for {self.batch_size} rows")
        lengths = self.lengths.tolist()
        for b, g in enumerate(grids):
            g = tuple(int(x) for x in g)
            if len(g) not in (2, 3) or min(g) < 1:
                raise ValueError(f"VisualTokens.grid must be (H, W) or (T, H, W) of positive ints, got {g}")
            if math.prod(g) != lengths[b]:
                raise ValueError(
                    f"VisualTokens.grid {g} holds {math.prod(g)} tokens but row {b} has {lengths[b]} valid tokens"
                )

    def _check_segments(self) -> None:
        if self.segments is None:
            return
        if len(self.segments) != self.batch_size:
            raise ValueError(
                f"VisualTokens.segments has {len(self.segments)} rows, features have {self.batch_size}"
            )
        for b, (segs, n) in enumerate(zip(self.segments, self.lengths.tolist(), strict=True)):
            if not segs or min(segs) < 1 or sum(segs) != n:
                raise ValueError(
                    f"VisualTokens.segments[{b}] = {segs} must be positive lengths summing to the row's {n} tokens"
                )

    @property
    def batch_size(self) -> int:
        """Number of rows ``B``."""
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        """Padded token count ``N``."""
        return self.features.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` number of valid tokens in each row (on CPU)."""
        if self.mask is None:
            return torch.full((self.batch_size,), self.num_tokens, dtype=torch.long)
        return self.mask.sum(1).cpu()

    def grid_of(self, row: int) -> Grid | None:
        """The grid of one row, or None."""
        if self.grid is None:
            return None
        g = self.grid[row] if isinstance(self.grid, list) else self.grid
        return tuple(int(x) for x in g)

    def segments_of(self, row: int) -> list[int]:
        """Segment lengths of one row: ``segments``, else one segment per frame of a 3-D grid, else the row."""
        if self.segments is not None:
            return list(self.segments[row])
        g = self.grid_of(row)
        if g is not None and len(g) == 3:
            return [g[1] * g[2]] * g[0]
        return [int(self.lengths[row])]

    def has(self, signal: str) -> bool:
        """Whether a signal (a field such as ``"cls_attn"`` or a key of ``signals``) is present."""
        if signal in ("features", "mask", "sizes", "metric"):
            return True
        if signal in ("grid", "cls_attn", "text", "segments"):
            return getattr(self, signal) is not None
        return signal in self.signals

    def row(self, b: int, start: int = 0, stop: int | None = None) -> TokenRow:
        """The valid tokens of row ``b`` (optionally only ``[start, stop)``) as a :class:`TokenRow`."""
        n = int(self.lengths[b])
        stop = n if stop is None else stop
        sl = slice(start, stop)
        text = None
        if self.text is not None:
            t = self.text[b]
            if self.text_mask is not None:
                t = t[: int(self.text_mask[b].sum())]
            text = t
        grid = self.grid_of(b)
        if grid is not None and (start, stop) != (0, n):
            grid = _segment_grid(grid, start, stop)
        return TokenRow(
            features=self.features[b, sl],
            metric=(self.metric if self.metric is not None else self.features)[b, sl],
            sizes=None if self.sizes is None else self.sizes[b, sl],
            cls_attn=None if self.cls_attn is None else self.cls_attn[b, sl],
            text=text,
            grid=grid,
            signals={k: v[b, sl] for k, v in self.signals.items()},
        )


def _segment_grid(grid: Grid, start: int, stop: int) -> Grid | None:
    """The grid of a contiguous slice when it is whole frames of a 3-D grid, else None."""
    if len(grid) == 3:
        hw = grid[1] * grid[2]
        if start % hw == 0 and stop % hw == 0:
            t = (stop - start) // hw
            return (grid[1], grid[2]) if t == 1 else (t, grid[1], grid[2])
    return None


def _check_prefix(name: str, mask: torch.Tensor) -> None:
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"VisualTokens.{name} must mark a left-aligned prefix of valid tokens in each row")
    if not bool(mask.any(1).all()):
        raise ValueError(f"VisualTokens.{name} has a row with no valid tokens; drop that row instead")


@dataclass
class TokenRow:
    """The valid tokens of one row (or one segment of a row), as compressors see them.

    Attributes:
        features: ``[n, C]``.
        metric: ``[n, Cm]`` features for similarity (the features themselves unless given).
        sizes: ``[n]`` or None (all ones).
        cls_attn: ``[n]`` or None.
        text: ``[t, C]`` valid text embeddings, or None.
        grid: ``(H, W)`` / ``(T, H, W)`` of this row or segment, or None.
        signals: further ``[n, ...]`` signals by name.
    """

    features: torch.Tensor
    metric: torch.Tensor
    sizes: torch.Tensor | None
    cls_attn: torch.Tensor | None
    text: torch.Tensor | None
    grid: Grid | None
    signals: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        """Number of tokens."""
        return self.features.shape[0]

    def size_weights(self) -> torch.Tensor:
        """``[n]`` float32 token sizes (ones when none were given)."""
        if self.sizes is None:
            return torch.ones(self.n, dtype=torch.float32, device=self.features.device)
        return self.sizes.float()
