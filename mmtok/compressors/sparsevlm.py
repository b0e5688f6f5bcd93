"""``sparsevlm``: text-guided sparsification of visual tokens inside the LLM, with token recycling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.fastv import check_layer, top_by_score
from mmtok.compressors.pdrop import geometric_counts, proportional_layers
from mmtok.core import RowPlan, TokenRow

# The paper's sparsification layers on 32-layer LLaVA-1.5 (2, 6, 15), as fractions of the depth.
_PAPER_LAYERS = (2 / 32, 6 / 32, 15 / 32)


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the text "raters", whose relevance to the visual tokens is above the mean.

    SparseVLM's relevance: ``P = softmax_text(H_v H_t^T)`` (``[n, T]``, each visual row a distribution
    over text tokens) averaged over the visual tokens; raters are the text tokens with ``R_t > mean(R)``
    (all of them when none is above, e.g. a single text token).
    """
    rel = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(0)
    raters = rel > rel.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-kNN), as SparseVLM recycles tokens.

    Density ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` with ``d = ||x_i - x_j|| / sqrt(C)`` and ``k`` =
    ``clusters``; ``delta_i`` = distance to the nearest denser token (the largest distance for the
    densest); the ``clusters`` tokens of largest ``rho * delta`` are centres and every token joins its
    nearest centre. Equal densities are ordered by index (the paper breaks them with random noise).

    Args:
        x: ``[m, C]`` tokens.
        clusters: number of clusters, ``1 <= clusters <= m``.

    Returns:
        ``centres`` ``[clusters]`` token indices and ``assign`` ``[m]`` cluster of each token.
    """
    m, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / c**0.5
    near = torch.topk(dist, min(clusters, m), dim=-1, largest=False).values
    density = torch.exp(-(near**2).mean(-1))
    idx = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = top_by_score(delta * density, clusters)
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


@register("sparsevlm")
@dataclass
class SparseVLM(Compressor):
    """Rank visual tokens by the attention of relevant text "raters", keep the top, recycle some of the rest.

    Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
    (ICML 2025), Section 3:

    1. Raters (Eq. 1-2 and the authors' code): ``R = mean_v softmax_t(H_v H_t^T)``; the text tokens with
       ``R_t > mean(R)`` rate the visual tokens (:func:`select_raters`, on the ``features`` and ``text``
       the row carries: inside the LLM, the hidden states at the sparsification layer; the authors take
       them once from the LLM's input, the same space at layer 0).
    2. Scores: the attention the raters pay each visual token at the sparsification layer, averaged over
       heads and raters (``signals["text_attn_all"]``, ``[B, N, T]``: text query ``t``'s attention to
       visual token ``n``, in the order of ``text``).
    3. Recycling (Section 3.4): of the pruned tokens, the ``recycle_ratio`` (30 %) + 1 best scored are
       clustered by DPC-kNN (:func:`dpc_knn`) into ``int(0.1 * that) + 1`` groups, each merged into one
       token (size-weighted mean, placed at its cluster centre's position); the rest are deleted.

    The output count equals the budget exactly: ``k_sel`` top tokens plus the recycled groups, with
    ``k_sel`` the largest count for which ``k_sel + groups(N - k_sel) == k`` (plain top-``k`` when no
    such split exists, e.g. ``k = 1``, or with ``recycle=False``). In the LLM, sparsification happens
    after the paper's layers 2, 6 and 15 of 32 (scaled to the model's depth), ranking with each layer's
    own attention and dropping from the next layer; the counts fall geometrically from ``N`` to the
    budget (the paper's hand-tuned per-budget lists, e.g. 576 -> 66 -> 30 -> 17 for 64, are specific
    to LLaVA-1.5).

    Attributes:
        layers: the sparsification (attention) layers, tokens leave from the next one; None for the
            paper's 2 / 6 / 15 of 32 scaled to the depth.
        recycle: merge part of the pruned tokens into aggregated tokens (the paper's recycling).
        recycle_ratio: share of the pruned tokens, best scored first, that are recycled (0.3).
        cluster_ratio: aggregated tokens per recycled token (0.1).
    """

    paper = (
        "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
        "(Zhang et al., ICML 2025)"
    )
    stage = "llm"
    stages = ("llm",)
    modalities = ("image", "video")
    requires = frozenset({"text", "text_attn_all"})

    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, (tuple, list)) or not self.layers:
                raise ValueError(f"sparsevlm: layers must be a non-empty tuple of ints, got {self.layers!r}")
            self.layers = tuple(check_layer("sparsevlm: each of layers", x, 0) for x in self.layers)
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError(f"sparsevlm: layers must be strictly increasing, got {self.layers}")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be True or False, got {self.recycle!r}")
        for name in ("recycle_ratio", "cluster_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise ValueError(f"sparsevlm: {name} must be a float in (0, 1], got {v!r}")

    def llm_schedule(self, num_visual: int, budget: int, num_layers: int) -> list[tuple[int, int, int]]:
        """``[(attention layer, drop layer = attention layer + 1, kept count), ...]``, last count = budget."""
        if self.layers is None:
            layers = proportional_layers(_PAPER_LAYERS, num_layers, "sparsevlm", 0, num_layers - 2)
        else:
            layers = list(self.layers)
            if layers[-1] + 1 >= num_layers:
                raise ValueError(
                    f"sparsevlm: layers={self.layers} but tokens leave after the last one and the language "
                    f"model has {num_layers} layers; use layers <= {num_layers - 2}"
                )
        counts = geometric_counts(num_visual, budget, len(layers), None)
        return [(a, a + 1, c) for a, c in zip(layers, counts, strict=True)]

    def split(self, n: int, k: int) -> tuple[int, int]:
        """``(k_sel, groups)``: top tokens kept and recycled groups, ``k_sel + groups == k``."""
        if self.recycle:
            for k_sel in range(k - 1, 0, -1):
                m = n - k_sel
                cand = min(m, int(m * self.recycle_ratio) + 1)
                groups = min(cand, int(cand * self.cluster_ratio) + 1)
                if k_sel + groups == k:
                    return k_sel, groups
                if k_sel + groups < k:
                    break
        return k, 0

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Raters, rater-attention scores, top ``k_sel`` plus recycled groups (``k`` tokens in all)."""
        attn = row.signals["text_attn_all"]
        text = row.text
        if attn.dim() != 2 or text is None or attn.shape[1] != text.shape[0]:
            t = None if text is None else text.shape[0]
            raise ValueError(
                "sparsevlm: signals['text_attn_all'] must be [B, N, T], one column per text token of `text` "
                f"({t} here), got a row of shape {tuple(attn.shape)}"
            )
        raters = select_raters(row.features, text)
        score = attn.float()[:, raters].mean(1)
        k_sel, groups = self.split(row.n, k)
        order = top_by_score(score, row.n)
        keep = order[:k_sel]
        if groups == 0:
            return RowPlan(keep)
        m = row.n - k_sel
        cand = order[k_sel : k_sel + min(m, int(m * self.recycle_ratio) + 1)]
        centres, member = dpc_knn(row.metric[cand], groups)
        assign = torch.full((row.n,), -1, dtype=torch.long, device=keep.device)
        assign[keep] = torch.arange(k_sel, device=keep.device)
        assign[cand] = k_sel + member
        return RowPlan(torch.cat([keep, cand[centres]]), assign)
