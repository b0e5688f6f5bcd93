"""TokenPlan: which input tokens survive and how the rest are merged, computed once and applied everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtok.core.merge import merge_tokens


@dataclass(frozen=True)
class RowPlan:
    """The plan of one row, in the row's own token indices, before canonical ordering.

    Attributes:
        keep: ``[k]`` long, the representative input token of each output token (any order, unique).
        assign: ``[n]`` long, for each input token the position in ``keep`` of its output token, or -1
            where it is dropped; None means pure pruning (each kept token is its own group).
    """

    keep: torch.Tensor
    assign: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenPlan:
    """A compression plan for a batch: computed once, applied to features, sizes, positions, overlays.

    Attributes:
        keep: ``[B, K]`` long, source index of each output token's representative, ascending in each
            row; slots past a row's count (``mask`` False) are padding and hold 0.
        assign: ``[B, N]`` long, output slot of each input token, -1 where dropped (and on padding).
        mask: ``[B, K]`` bool, valid output slots (rows may keep different numbers of tokens).
        sizes: ``[B, K]`` float32, how many original tokens each output token stands for
            (0 on padding).
        source_sizes: ``[B, N]`` float32, the input token sizes the plan was made with (the merge weights).
        merging: whether any output token stands for more than one input token.
    """

    keep: torch.Tensor
    assign: torch.Tensor
    mask: torch.Tensor
    sizes: torch.Tensor
    source_sizes: torch.Tensor
    merging: bool

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` number of output tokens per row."""
        return self.mask.sum(1)

    @property
    def num_output(self) -> int:
        """Padded output length ``K``."""
        return self.keep.shape[1]

    @property
    def num_input(self) -> int:
        """Padded input length ``N``."""
        return self.assign.shape[1]

    @classmethod
    def from_rows(
        cls, rows: list[RowPlan], num_input: int, source_sizes: torch.Tensor | None = None
    ) -> TokenPlan:
        """Build a batch plan from per-row plans, sorting each row's outputs by representative index.

        Args:
            rows: one :class:`RowPlan` per row, indices relative to the row's valid prefix.
            num_input: padded input length ``N``.
            source_sizes: ``[B, N]`` input token sizes (ones when None).

        Raises:
            ValueError: if a row plan is inconsistent (duplicate or out-of-range keeps, an assign that
                does not map each representative to its own slot).
        """
        if not rows:
            raise ValueError("TokenPlan.from_rows needs at least one row")
        device = rows[0].keep.device
        b = len(rows)
        k_max = max(int(r.keep.numel()) for r in rows)
        keep = torch.zeros(b, k_max, dtype=torch.long, device=device)
        assign = torch.full((b, num_input), -1, dtype=torch.long, device=device)
        mask = torch.zeros(b, k_max, dtype=torch.bool, device=device)
        merging = False
        for i, r in enumerate(rows):
            kr = r.keep.to(device=device, dtype=torch.long).reshape(-1)
            k = kr.numel()
            if k == 0:
                raise ValueError(f"row {i} of the plan keeps no token")
            order = torch.argsort(kr)
            sorted_keep = kr[order]
            if bool((sorted_keep[1:] == sorted_keep[:-1]).any()) or int(sorted_keep[0]) < 0:
                raise ValueError(f"row {i} of the plan keeps a token twice or a negative index")
            if int(sorted_keep[-1]) >= num_input:
                raise ValueError(f"row {i} of the plan keeps index {int(sorted_keep[-1])} >= N={num_input}")
            keep[i, :k] = sorted_keep
            mask[i, :k] = True
            slot_of_old = torch.empty_like(order)
            slot_of_old[order] = torch.arange(k, device=device)
            if r.assign is None:
                assign[i, sorted_keep] = torch.arange(k, device=device)
            else:
                a = r.assign.to(device=device, dtype=torch.long).reshape(-1)
                if int(a.max()) >= k or int(a.min()) < -1:
                    raise ValueError(f"row {i} of the plan assigns to a slot outside [-1, {k})")
                new = torch.where(a >= 0, slot_of_old[a.clamp(min=0)], a)
                if not bool((new[sorted_keep] == torch.arange(k, device=device)).all()):
                    raise ValueError(f"row {i} of the plan: a representative is not assigned to its own slot")
                assign[i, : a.numel()] = new
                merging = merging or int((a >= 0).sum()) > k
        if source_sizes is None:
            source_sizes = torch.ones(b, num_input, dtype=torch.float32, device=device)
        source_sizes = source_sizes.to(device=device, dtype=torch.float32)
        _, sizes = merge_tokens(source_sizes.unsqueeze(-1), assign, source_sizes, k_max)
        return cls(keep, assign, mask, sizes, source_sizes, merging)

    def apply(self, x: torch.Tensor, reduce: str = "auto") -> torch.Tensor:
        """Apply the plan to a per-token tensor.

        Args:
            x: ``[B, N, ...]`` features, sizes, positions or any per-token values.
            reduce: ``"mean"`` (size-weighted mean over each group), ``"gather"`` (take each group's
                representative: use for positions and ids), ``"sum"`` (sum over each group) or
                ``"auto"`` (``"mean"`` when the plan merges, else ``"gather"``).

        Returns:
            ``[B, K, ...]`` in ``x.dtype`` on ``x.device``; padded slots are zero.
        """
        if x.dim() < 2 or tuple(x.shape[:2]) != (self.keep.shape[0], self.num_input):
            raise ValueError(
                f"TokenPlan.apply expects [B={self.keep.shape[0]}, N={self.num_input}, ...], got {tuple(x.shape)}"
            )
        if reduce not in ("auto", "mean", "gather", "sum"):
            raise ValueError(f"reduce must be 'auto', 'mean', 'gather' or 'sum', got {reduce!r}")
        if reduce == "auto":
            reduce = "mean" if self.merging else "gather"
        keep, mask = self.keep.to(x.device), self.mask.to(x.device)
        if reduce == "gather" or (reduce == "mean" and not self.merging):
            idx = keep.reshape(keep.shape + (1,) * (x.dim() - 2)).expand(*keep.shape, *x.shape[2:])
            out = torch.gather(x, 1, idx)
            return out * mask.reshape(mask.shape + (1,) * (x.dim() - 2)).to(out.dtype)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        weights = self.source_sizes.to(x.device) if reduce == "mean" else torch.ones_like(self.source_sizes)
        out, sizes = merge_tokens(flat, self.assign.to(x.device), weights.to(x.device), self.num_output)
        if reduce == "sum":
            out = (out.float() * sizes.unsqueeze(-1)).to(x.dtype)
        return out.reshape(out.shape[0], out.shape[1], *x.shape[2:])

    def to(self, device: torch.device | str) -> TokenPlan:
        """The same plan on another device."""
        return TokenPlan(
            self.keep.to(device),
            self.assign.to(device),
            self.mask.to(device),
            self.sizes.to(device),
            self.source_sizes.to(device),
            self.merging,
        )

    def row_keep(self, b: int) -> torch.Tensor:
        """``[k_b]`` the valid kept indices of row ``b``."""
        return self.keep[b, : int(self.mask[b].sum())]
