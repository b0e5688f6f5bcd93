"""``mmtok bench testbed``: a testbed training step with the attention supervision read two ways.

The attention supervision (:func:`mmtok.testbed.dense.attention_loss`) needs one head's probabilities at the
answer positions. Read through ``output_attentions=True`` the language model must run eager attention in
every layer; :func:`mmtok.testbed.attention_rows.query_rows` keeps SDPA and computes only those rows. Each
case times the same forward pass, answer loss plus attention loss, and backward pass, on a shipped-size model
(random weights: the time does not depend on them) and a training batch of the generated data:
``testbed-llava`` at 32 images, ``testbed-qwen2vl`` at 8 images and 8 videos (rows of 1,180 tokens). For
the mixed batch a third way runs one forward pass per medium
(:func:`mmtok.testbed.dense_step.split_by_medium`), so that the image rows are not padded to the videos'
length, and pools the losses exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mmtok.bench.timing import machine, time_call, write_json
from mmtok.table import format_table
from mmtok.testbed.attention_rows import answer_query_positions, query_rows
from mmtok.testbed.data import dataset
from mmtok.testbed.dense import attention_loss, attention_terms
from mmtok.testbed.dense_step import ATTEND_LAYER as LAYER
from mmtok.testbed.dense_step import split_by_medium
from mmtok.testbed.models import IGNORE, Size, encode_items, get_spec

# (testbed, items per modality in the batch), as the shipped models were trained.
CASES = (("testbed-llava", 32), ("testbed-qwen2vl", 8))
SPLIT = "sdpa + query_rows, split by medium"


def _media_cells(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each media position's index within its row's media tokens, and every media token as a key."""
    media = torch.zeros_like(ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id", "audio_token_id"):
        token = getattr(model.config, name, None)
        if token is not None:
            media |= ids == token
    cells = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        cells[b, media[b]] = torch.arange(int(media[b].sum()))
    return cells, torch.ones(ids.shape[0], int(media.sum(1).max()), dtype=torch.long)


def _steps(name: str, per_media: int, size: str | Size = "full") -> dict[str, Callable[[], float]]:
    """The two ways of one training step, each returning its loss (they must agree)."""
    spec = get_spec(name)
    model, processor = spec.build(size, seed=0)
    model.train()
    items = [it for m in spec.modalities for it in dataset(m, "train", per_media, 0, form="mixed")]
    batch = encode_items(processor, items)
    cells, key = _media_cells(model, batch["input_ids"])
    lm = model.model.language_model

    def eager() -> float:
        lm.set_attn_implementation("eager")
        out = model(**batch, output_attentions=True)
        loss = out.loss + attention_loss(out.attentions[LAYER], batch["labels"], cells, key)
        loss.backward()
        lm.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)
        return loss.item()

    def rows() -> float:
        with query_rows(model, LAYER, answer_query_positions(batch["labels"])) as recorded:
            out = model(**batch)
        loss = out.loss + attention_loss(recorded, batch["labels"], cells, key)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    def split() -> float:
        sums, counts = [], []
        for sub in split_by_medium(model, batch):
            sub_cells, sub_key = _media_cells(model, sub["input_ids"])
            with query_rows(model, LAYER, answer_query_positions(sub["labels"])) as recorded:
                out = model(**sub)
            n = int((sub["labels"][:, 1:] != IGNORE).sum())
            total, rows_ = attention_terms(recorded, sub["labels"], sub_cells, sub_key)
            sums.append((out.loss * n, total))
            counts.append((n, rows_))
        answers, attended = (sum(c[i] for c in counts) for i in (0, 1))
        loss = sum(s[0] for s in sums) / answers + sum(s[1] for s in sums) / attended
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    ways = {"eager + output_attentions": eager, "sdpa + query_rows": rows}
    if len(split_by_medium(model, batch)) > 1:
        ways[SPLIT] = split
    return ways


def run(out_path: Path, repeats: int = 3, cases: tuple[tuple[str, int], ...] = CASES,
        size: str | Size = "full") -> dict:
    """Time each case both ways; write ``out_path`` (JSON) and return the results.

    Each result carries the step's ``loss``: both ways compute the same one (to float rounding).
    """
    results = []
    for name, per_media in cases:
        for way, step in _steps(name, per_media, size).items():
            timed = time_call(step, repeats=repeats, warmup=1, budget_s=120.0)
            results.append({"testbed": name, "per_media": per_media, "way": way, "loss": step(), **timed})
    res = {"machine": machine(), "results": results}
    write_json(res, out_path)
    return res


def to_markdown(res: dict) -> str:
    """One row per testbed and way: ms per step, speed-up over eager, loss difference from eager."""
    eager = {r["testbed"]: r for r in res["results"] if r["way"] == "eager + output_attentions"}
    rows = [[r["testbed"], r["per_media"], r["way"], f"{r['ms']:,.0f}", f"{eager[r['testbed']]['ms'] / r['ms']:.2f}x",
             f"{abs(eager[r['testbed']]['loss'] - r['loss']):.1e}"] for r in res["results"]]
    header = ["testbed", "items per medium", "way", "ms per step", "speed-up", "loss difference"]
    return format_table(header, rows, markdown=True)
