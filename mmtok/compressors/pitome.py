"""``pitome``: energy-protected token merging (Tran et al., NeurIPS 2024), iterated to a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.compressors.base import Compressor, register
from mmtok.compressors.tome import MergeGroups, check_budget, check_protected, check_step_fraction
from mmtok.core import RowPlan, TokenRow, cosine_matrix, normalize


def energy_from_similarity(sim: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy score of every token (Tran et al., NeurIPS 2024, Eq. 4).

    ``E_i = (1/N) sum_j f_m(cos(x_i, x_j))`` with ``f_m(s) = s`` if ``s >= m`` else
    ``alpha * (exp(s - m) - 1)``: neighbours closer than the margin add their similarity, the others
    a bounded negative amount, so tokens inside large clusters of similar tokens score high and
    isolated tokens score low. The sum runs over all tokens, the token itself included.

    Args:
        sim: ``[N, N]`` float32 pairwise cosine similarities.
        margin: the margin ``m`` (a cosine similarity).
        alpha: the scale ``alpha`` of the exponential branch.

    Returns:
        ``[N]`` float32 energies.
    """
    return torch.where(sim >= margin, sim, alpha * torch.expm1(sim - margin)).mean(dim=1)


def energy_scores(x: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """:func:`energy_from_similarity` of the tokens ``x`` (``[N, C]`` -> ``[N]`` float32)."""
    return energy_from_similarity(cosine_matrix(x), margin, alpha)


@register("pitome")
@dataclass
class PiToMe(Compressor):
    """PiToMe: merge inside dense clusters, protect isolated (informative) tokens, until ``k`` remain.

    Implements Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
    NeurIPS 2024, Sec. 3 (energy-based ordered bipartite soft matching). Each round, on the tokens
    merged so far (metrics are size-weighted means of their members):

    1. energy score of every unprotected token (Eq. 4, :func:`energy_scores`);
    2. sort by energy, highest first; the top ``2r`` are the merge candidates, the rest (low energy:
       isolated tokens, small distinct regions) are protected this round;
    3. split the candidates into A and B by alternating over the energy order, so each set holds
       tokens of similar energy;
    4. each A token merges into its most cosine-similar B token (size-weighted mean; ties go to the
       first B token), removing exactly ``r`` tokens.

    The paper applies one round per encoder layer, removing a small share of the tokens per layer;
    mmtok applies rounds to the encoder output with ``r = min(ceil(step_fraction * unprotected),
    unprotected // 2, tokens - k)`` until exactly ``k`` remain. The per-round share matters: with
    ``2r`` equal to all tokens nothing would be protected.

    Representatives: ``keep[j]`` is the B token (destination) each group was built on, as in ``tome``.

    Options:
        margin: the energy margin ``m``. The paper sets it per layer, ``m = 0.9 - 0.9 * l / L`` with
            ``l`` the layer index of ``L`` (the authors' code uses 0.5 as a single-margin default).
            mmtok merges outside the encoder, where no layer index applies; the default 0.5 is the
            authors' single default and sits mid-range of the schedule (``l / L`` about 0.44). To
            mimic placement after layer ``l``, pass ``0.9 * (1 - l / L)``.
        alpha: scale of the exponential branch of ``f_m``; the paper's value is 1.0.
        step_fraction: at most this share of the unprotected tokens is removed per round, in
            (0, 0.5]. Default 0.1 (a keep ratio of 0.9 per round, like a gradual layer-wise
            schedule): only the top fifth of tokens by energy are candidates each round, so isolated
            tokens stay protected until the dense clusters are used up.
        protected: the first ``protected`` tokens of each row (or segment) are never merged (a class
            token, as in the paper's ``class_token`` handling). Default 0.
    """

    paper = "Accelerating Transformers with Spectrum-Preserving Token Merging (Tran et al., NeurIPS 2024)"
    stage = "pre_llm"
    stages = ("vision", "pre_llm")
    modalities = ("image", "video", "audio")

    margin: float = 0.5
    alpha: float = 1.0
    step_fraction: float = 0.1
    protected: int = 0

    def __post_init__(self) -> None:
        for name in ("margin", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"pitome: {name} must be a finite number, got {v!r}")
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"pitome: margin is a cosine similarity and must be in [-1, 1], got {self.margin}")
        if self.alpha <= 0:
            raise ValueError(f"pitome: alpha must be > 0, got {self.alpha}")
        check_step_fraction("pitome", self.step_fraction)
        check_protected("pitome", self.protected)

    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Energy-ordered bipartite merging rounds until ``k`` groups remain."""
        p = check_budget("pitome", min(self.protected, row.n), k)
        groups = MergeGroups.start(row)
        # Pairwise similarities of the unprotected groups, kept up to date: a round only changes
        # the destinations' means, so only their rows and columns are recomputed.
        sim = cosine_matrix(groups.metric[p:])
        while groups.count > k:
            free = groups.count - p
            r = min(max(1, math.ceil(self.step_fraction * free)), free // 2, groups.count - k)
            energy = energy_from_similarity(sim, self.margin, self.alpha)
            cand = torch.sort(energy, descending=True, stable=True).indices[: 2 * r]
            a, b = cand[0::2], cand[1::2]
            dst = b[sim[a][:, b].max(dim=1).indices]
            groups.merge(a + p, dst + p)
            alive = torch.ones(free, dtype=torch.bool, device=sim.device)
            alive[a] = False
            changed = (alive.long().cumsum(0) - 1)[dst.unique()]
            keep = alive.nonzero().squeeze(1)
            sim = sim.index_select(0, keep).index_select(1, keep)
            xn = normalize(groups.metric[p:])
            rows = xn[changed] @ xn.T
            sim.index_copy_(0, changed, rows)
            sim.index_copy_(1, changed, rows.T)
        return groups.plan()
