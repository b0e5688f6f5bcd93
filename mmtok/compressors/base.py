"""The Compressor contract and the registry of compressors by name."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch

from mmtok.core.budget import BudgetLike, segment_counts
from mmtok.core.plan import RowPlan, TokenPlan
from mmtok.core.tokens import TokenRow, VisualTokens

STAGES = ("vision", "pre_llm", "llm")
MODALITIES = ("image", "video", "audio")

_REGISTRY: dict[str, type[Compressor]] = {}


@dataclasses.dataclass
class Compressor(abc.ABC):
    """Base class of every compressor: turns :class:`VisualTokens` and a budget into a :class:`TokenPlan`.

    Subclasses are dataclasses whose fields are the method's options, declare what they need as class
    variables, and implement :meth:`plan_row` for one row (or one frame / crop of a row). This base
    validates the inputs, resolves the budget (per item, per frame, per crop, adaptive), calls
    :meth:`plan_row` on each segment, and assembles the batch plan.

    Class variables:
        name: the registered name.
        paper: the paper the method implements (title, venue, year).
        stage: where the method runs by default: ``"vision"``, ``"pre_llm"`` or ``"llm"``.
        stages: every stage the method can run at.
        modalities: which modalities it accepts.
        requires: signals it needs (``"cls_attn"``, ``"text"``, ``"grid"``, keys of ``signals``).
        adaptive: True when the output count may be below the budget (the budget is a ceiling).
        honours_budget: False only for ``identity``, which keeps everything whatever the budget.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"
    stages: ClassVar[tuple[str, ...]] = ("pre_llm",)
    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    requires: ClassVar[frozenset[str]] = frozenset()
    adaptive: ClassVar[bool] = False
    honours_budget: ClassVar[bool] = True

    seed: int = 0

    def __call__(self, tokens: VisualTokens, budget: BudgetLike) -> TokenPlan:
        """Plan the compression of a batch.

        Args:
            tokens: the batch, with the signals this method ``requires``.
            budget: tokens per row (int), a fraction in (0, 1] (float) or a :class:`mmtok.Budget`.

        Returns:
            A :class:`TokenPlan` with exactly the budgeted number of output tokens per row (at most it
            for ``adaptive`` methods).

        Raises:
            TypeError: if ``tokens`` is not :class:`VisualTokens` or the budget has the wrong type.
            ValueError: if a required signal is missing or the budget is out of range.
        """
        if not isinstance(tokens, VisualTokens):
            raise TypeError(f"{self.name} expects mmtok.VisualTokens, got {type(tokens).__name__}")
        missing = sorted(s for s in self.requires if not tokens.has(s))
        if missing:
            raise ValueError(
                f"compressor {self.name!r} needs the signal(s) {missing}, which these tokens lack; "
                f"pass them to VisualTokens (e.g. VisualTokens(features, {missing[0]}=...)) or use an adapter "
                f"stage that computes them ({', '.join(self.stages)})"
            )
        plan_segments = segment_counts(budget, tokens)
        generator = torch.Generator().manual_seed(int(self.seed))
        rows = []
        with torch.no_grad():
            for b, segments in enumerate(plan_segments):
                parts, start = [], 0
                for n_s, k_s in segments:
                    if k_s > 0:
                        parts.append(
                            (start, self._plan_segment(tokens.row(b, start, start + n_s), k_s, generator))
                        )
                    start += n_s
                rows.append(_join_segments(parts, start, tokens.features.device))
        return TokenPlan.from_rows(rows, tokens.num_tokens, tokens.sizes)

    def _plan_segment(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        if k >= row.n:
            return RowPlan(torch.arange(row.n, device=row.features.device))
        plan = self.plan_row(row, k, generator)
        got = int(plan.keep.numel())
        if got > k or (got < k and not self.adaptive) or got < 1:
            raise RuntimeError(f"compressor {self.name!r} produced {got} tokens for a budget of {k}")
        return plan

    @abc.abstractmethod
    def plan_row(self, row: TokenRow, k: int, generator: torch.Generator) -> RowPlan:
        """Plan one row or segment.

        Args:
            row: the segment's valid tokens and signals (``row.n > k``).
            k: tokens to output (``1 <= k < row.n``).
            generator: a CPU generator seeded from ``self.seed``, for random choices.

        Returns:
            A :class:`RowPlan` with exactly ``k`` kept tokens (at most ``k`` for adaptive methods).
        """

    @classmethod
    def describe(cls) -> dict[str, object]:
        """Name, paper, stage, modalities and required signals, for tables and the app."""
        return {
            "name": cls.name,
            "paper": cls.paper,
            "stage": cls.stage,
            "stages": list(cls.stages),
            "modalities": list(cls.modalities),
            "requires": sorted(cls.requires),
            "adaptive": cls.adaptive,
        }


def _join_segments(parts: list[tuple[int, RowPlan]], n: int, device: torch.device) -> RowPlan:
    """Concatenate segment plans (each in its segment's indices) into one row plan."""
    if len(parts) == 1 and parts[0][0] == 0 and parts[0][1].keep.numel() > 0:
        plan = parts[0][1]
        if plan.assign is None or plan.assign.numel() == n:
            return plan
    keeps, assign, offset = [], torch.full((n,), -1, dtype=torch.long, device=device), 0
    for start, plan in parts:
        keep = plan.keep.to(device)
        k = keep.numel()
        if plan.assign is None:
            assign[start + keep] = torch.arange(offset, offset + k, device=device)
        else:
            a = plan.assign.to(device)
            assign[start : start + a.numel()] = torch.where(a >= 0, a + offset, a)
        keeps.append(keep + start)
        offset += k
    return RowPlan(torch.cat(keeps), assign)


C = TypeVar("C", bound=type[Compressor])


def register(name: str) -> Callable[[C], C]:
    """Class decorator that registers a compressor under ``name``."""

    def wrap(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"@register({name!r}) must decorate a Compressor subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"a compressor named {name!r} is already registered ({_REGISTRY[name].__name__})"
            )
        if cls.stage not in STAGES or any(s not in STAGES for s in cls.stages):
            raise ValueError(f"{cls.__name__}: stages must be among {STAGES}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_compressors(stage: str | None = None, modality: str | None = None) -> list[str]:
    """Names of the registered compressors, optionally only those usable at a stage / for a modality."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return sorted(
        n
        for n, c in _REGISTRY.items()
        if (stage is None or stage in c.stages) and (modality is None or modality in c.modalities)
    )


def compressor_class(name: str) -> type[Compressor]:
    """The class registered under ``name``."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_compressor(name: str, **options: object) -> Compressor:
    """Create a registered compressor with its options.

    Raises:
        ValueError: for an unknown name or option, listing what is valid.
    """
    cls = compressor_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"compressor {name!r} has no option(s) {unknown}; valid options: {sorted(fields)}")
    return cls(**options)
