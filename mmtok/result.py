"""``Result``: what one ``compress_then_generate`` call produced, measured and planned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtok.table import format_table

TIMING_KEYS = ("encode", "compress", "prefill", "decode", "total")


@dataclass
class Result:
    """The answer of a (compressed) generation and what it cost.

    Attributes:
        text: the generated text: a ``str`` for one prompt given as a ``str``, else one per prompt.
        tokens: per modality (``"image"``, ``"video"``, ...), ``{"before": [B], "after": [B]}`` visual tokens
            per prompt row before and after compression; ``"sequence"``: the valid prompt length of each
            row before and after, and ``"seen"``, the lengths the language model actually received in
            its prefill (read from its input, not computed); at the ``llm`` stage also ``"kv"``, every
            layer's KV-cache length after the prefill (the tokens dropped inside the LM are gone from it).
        timings: seconds: ``encode`` (vision tower and projector), ``compress`` (signals, plan, splice),
            ``prefill`` (from ``generate()`` to the first token: time to first token), ``decode`` (the
            remaining tokens) and ``total`` (the whole call).
        peak_memory_bytes: the peak accelerator memory allocated during the call (CUDA), or the peak
            resident memory of the process (CPU, Linux), or None where neither can be read.
        plans: per modality, the :class:`mmtok.TokenPlan` applied (one row per image / video).
        item_rows: per modality, the prompt row of each planned item.
        grids: per modality, the token grid of each item (for drawing the kept tokens on a picture).
        method: the compressor's name; ``budget`` and ``stage`` as used.
        sequences: ``[B, T]`` generated token ids (new tokens only).
        output: ``generate()``'s own return value when it is a dict-like output (e.g. with
            ``return_dict_in_generate=True, output_logits=True``), else None.
        baseline: with ``compare=True``, the :class:`Result` of the same call without compression.
    """

    text: str | list[str]
    tokens: dict[str, dict[str, list[int]]]
    timings: dict[str, float]
    peak_memory_bytes: int | None = None
    plans: dict[str, Any] = field(default_factory=dict)
    item_rows: dict[str, list[int]] = field(default_factory=dict)
    grids: dict[str, list[Any]] = field(default_factory=dict)
    method: str = ""
    budget: Any = None
    stage: str = ""
    sequences: Any = None
    output: Any = None
    baseline: Result | None = None

    @property
    def texts(self) -> list[str]:
        """The generated texts as a list (one per prompt)."""
        return [self.text] if isinstance(self.text, str) else list(self.text)

    def total_tokens(self, key: str, when: str) -> int:
        """Sum over rows of ``tokens[key][when]`` (0 when absent)."""
        return int(sum(self.tokens.get(key, {}).get(when, [])))

    def table(self) -> str:
        """A plain-text table of tokens and timings (beside the baseline when there is one)."""
        keys = [k for k in self.tokens if k != "sequence"] + ["sequence"]
        rows: list[list[object]] = []
        base = self.baseline
        for k in keys:
            if k not in self.tokens:
                continue
            label = "sequence (prompt)" if k == "sequence" else f"{k} tokens"
            before, after = self.total_tokens(k, "before"), self.total_tokens(k, "after")
            share = f"{100.0 * after / before:.1f}%" if before else "-"
            rows.append([label, before, after, share])
        head = ["tokens", "before", f"after ({self.method} @ {self.budget}, {self.stage})", "kept"]
        out = [format_table(head, rows)]
        trows: list[list[object]] = []
        for k in TIMING_KEYS:
            mine = self.timings.get(k)
            ref = base.timings.get(k) if base is not None else None
            row: list[object] = [k, "-" if mine is None else f"{mine * 1e3:.1f}"]
            if base is not None:
                row += ["-" if ref is None else f"{ref * 1e3:.1f}", _ratio(mine, ref)]
            trows.append(row)
        mem = _mib(self.peak_memory_bytes)
        if base is not None:
            trows.append(["peak memory (MiB)", mem, _mib(base.peak_memory_bytes), _ratio(
                self.peak_memory_bytes, base.peak_memory_bytes)])
            thead = ["time (ms)", "compressed", "uncompressed", "ratio"]
        else:
            trows.append(["peak memory (MiB)", mem])
            thead = ["time (ms)", "compressed"]
        out.append(format_table(thead, trows))
        return "\n\n".join(out)


def _ratio(a: float | int | None, b: float | int | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"
