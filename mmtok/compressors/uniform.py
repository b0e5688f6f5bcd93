"""``uniform``: keep ``k`` tokens on an even stride over the grid (the spatial-subsampling baseline).

Also home of :func:`grid_windows`, the tiling of a grid into exactly ``k`` near-equal windows that
``uniform`` (one token per window) and ``pool`` (the mean of each window) share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.core import RowPlan, TokenRow


def _bounds(length: int, parts: int) -> list[int]:
    """Boundaries ``[0, ..., length]`` of ``parts`` pieces of ``range(length)``, sizes within one."""
    return [(i * length) // parts for i in range(parts + 1)]


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts that differ by at most one, the larger ones spread evenly."""
    base, extra = divmod(total, parts)
    counts = [base] * parts
    for j in range(extra):
        counts[((2 * j + 1) * parts) // (2 * extra)] += 1
    return counts


def _mid(lo: int, hi: int) -> int:
    """The middle index of ``[lo, hi)`` (the lower one of two middles)."""
    return (lo + hi - 1) // 2


def _windows_2d(h: int, w: int, k: int) -> list[tuple[int, int, int, int]]:
    """``k`` windows ``(r0, r1, c0, c1)`` tiling an ``h x w`` grid, in raster order of the windows."""
    # Bands of rows, as close to square cells as k allows, but never more than w windows in a band.
    kh = math.floor(math.sqrt(k * h / w) + 0.5)
    kh = min(h, k, max(kh, -(-k // w)))
    rows = _bounds(h, kh)
    out = []
    for i, c in enumerate(_spread(k, kh)):
        cols = _bounds(w, c)
        out.extend((rows[i], rows[i + 1], cols[j], cols[j + 1]) for j in range(c))
    return out


def grid_windows(n: int, k: int, grid: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile ``n`` tokens into exactly ``k`` contiguous windows of near-equal size.

    * ``(H, W)`` grid: ``kh = round(sqrt(k * H / W))`` bands of rows (clamped to
      ``[ceil(k / W), min(H, k)]``), band boundaries at ``floor(i * H / kh)``. The ``k`` windows are
      shared out over the bands as evenly as possible (``k // kh`` each, the ``k % kh`` extra ones spread
      evenly over the bands), and a band with ``c`` windows is cut at ``floor(j * W / c)``. When ``k``
      factors as ``kh x kw`` matching the grid's aspect (e.g. 576 -> 64 = 8 x 8) this is the plain
      ``kh x kw`` tiling with ``H/kh x W/kw`` windows; otherwise the bands hold different numbers of
      windows (``k = 17`` on 6 x 6: 4, 4, 5, 4), so the budget is always met exactly and no window is
      empty.
    * ``(T, H, W)`` grid: ``min(T, k)`` bands of frames (boundaries ``floor(i * T / kt)``) share ``k`` as
      above, and each band is tiled in ``(H, W)`` (a window spans the band's frames).
    * no grid: ``k`` runs of consecutive raster indices, boundaries at ``floor(i * n / k)``.

    Args:
        n: number of tokens (``prod(grid)`` when a grid is given).
        k: number of windows, ``1 <= k <= n``.
        grid: ``(H, W)``, ``(T, H, W)`` or None.

    Returns:
        ``(window, centre)``: ``[n]`` long window of each token, and ``[k]`` long the middle token of each
        window (on the CPU).
    """
    if not 1 <= k <= n:
        raise ValueError(f"grid_windows: k must be in [1, n={n}], got {k}")
    if grid is None or len(grid) not in (2, 3):
        bounds = _bounds(n, k)
        window = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:-1]), right=True)
        centre = torch.tensor([_mid(bounds[j], bounds[j + 1]) for j in range(k)])
        return window, centre
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    if t * h * w != n:
        raise ValueError(f"grid_windows: grid {grid} holds {t * h * w} tokens, not {n}")
    kt = min(t, k)
    frames = _bounds(t, kt)
    window = torch.empty(t, h, w, dtype=torch.long)
    centres = []
    for i, c in enumerate(_spread(k, kt)):
        f0, f1 = frames[i], frames[i + 1]
        for r0, r1, c0, c1 in _windows_2d(h, w, c):
            window[f0:f1, r0:r1, c0:c1] = len(centres)
            centres.append((_mid(f0, f1) * h + _mid(r0, r1)) * w + _mid(c0, c1))
    return window.reshape(-1), torch.tensor(centres)


@register("uniform")
@dataclass
class Uniform(Compressor):
    """Keep the middle token of each of ``k`` near-equal windows: an even 2-D stride over the grid.

    The spatial-subsampling baseline of the token-reduction literature (strided / grid sampling of
    patches). The layout is :func:`grid_windows`: for ``(H, W) = (24, 24)`` and ``k = 64`` it keeps rows
    and columns ``1, 4, 7, ..., 22`` (the centres of the 3 x 3 cells); for ``k`` that does not factor into
    the grid, rows of windows hold ``k // kh`` or ``k // kh + 1`` tokens each, so exactly ``k`` tokens are
    kept, still spread evenly. Without a grid (or for a segment whose grid is unknown), it keeps the
    middle of ``k`` equal runs of raster indices, i.e. evenly spaced indices.
    """

    paper = "baseline (uniform strided grid sampling)"
    stage = "pre_llm"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video", "audio")

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Keep the middle token of each window of :func:`grid_windows` (``[k]`` indices)."""
        _, centre = grid_windows(row.n, k, row.grid)
        return RowPlan(centre.to(row.features.device))
