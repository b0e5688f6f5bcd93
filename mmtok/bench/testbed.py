"""``mmtok bench testbed``: a testbed training step with the attention supervision read two ways.

The attention supervision (:func:`mmtok.testbed.dense.attention_loss`) needs one head's probabilities at the
answer positions. Read through ``output_attentions=True`` the language model must run eager attention in
every layer; :func:`mmtok.testbed.attention_rows.query_rows` keeps SDPA and computes only those rows. Each
case times the same forward pass, answer loss plus attention loss, and backward pass, on a shipped-size model
(random weights: the time does not depend on them) and a training batch of the generated data:
``testbed-llava`` at 32 images, ``testbed-qwen2vl`` at 8 images and 8 videos (rows of 1,180 tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mmtok.bench.timing import machine, time_call, write_json
from mmtok.table import format_table
from mmtok.testbed.attention_rows import answer_query_positions, query_rows
from mmtok.testbed.data import dataset
from mmtok.testbed.dense import attention_loss
from mmtok.testbed.models import Size, encode_items, get_spec

# (testbed, items per modality in the batch), as the shipped models were trained.
CASES = (("testbed-llava", 32), ("testbed-qwen2vl", 8))
LAYER = 1  # the supervised layer of mmtok.testbed.train


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

    return {"eager + output_attentions": eager, "sdpa + query_rows": rows}


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
    """One row per testbed: ms per step each way and the ratio."""
    by = {(r["testbed"], r["way"]): r for r in res["results"]}
    rows = []
    for name in dict.fromkeys(r["testbed"] for r in res["results"]):
        eager, rows_ = by[(name, "eager + output_attentions")], by[(name, "sdpa + query_rows")]
        rows.append([name, eager["per_media"], f"{eager['ms']:,.0f}", f"{rows_['ms']:,.0f}",
                     f"{eager['ms'] / rows_['ms']:.2f}x", f"{abs(eager['loss'] - rows_['loss']):.1e}"])
    header = ["testbed", "items per medium", "eager + output_attentions (ms)", "sdpa + query_rows (ms)", "speed-up",
              "loss difference"]
    return format_table(header, rows, markdown=True)
