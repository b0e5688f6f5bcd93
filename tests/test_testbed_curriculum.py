"""The easy-first curriculum: background tokens phased in, kept tokens at their original positions."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.curriculum import background_share, image_features, keep_mask, reduced_inputs  # noqa: E402
from mmtok.testbed.data import dataset  # noqa: E402
from mmtok.testbed.data.images import CELL, IMAGE_SIZE  # noqa: E402
from mmtok.testbed.dense import batch_labels  # noqa: E402
from mmtok.testbed.models import IGNORE, Size, encode_items, get_spec  # noqa: E402
from mmtok.testbed.train import train  # noqa: E402

GRID = Size(image_size=IMAGE_SIZE, patch_size=CELL, vision_hidden=16, vision_layers=1, vision_heads=2,
            text_hidden=16, text_layers=1, text_heads=2, text_kv_heads=1, mlp_ratio=2)


@pytest.fixture(scope="module")
def grid_batch():
    torch.set_num_threads(1)
    model, processor = get_spec("testbed-llava").build(GRID, 0)
    model.eval()
    items = list(dataset("image", "train", 3, form="mixed"))
    return model, encode_items(processor, items), batch_labels(items, CELL)


def test_background_share_schedule() -> None:
    assert background_share(0, 100, 0.4) == 0.0
    assert background_share(20, 100, 0.4) == pytest.approx(0.5)
    assert background_share(40, 100, 0.4) == 1.0 and background_share(99, 100, 0.4) == 1.0
    assert background_share(0, 100, 0.0) == 1.0  # no curriculum: whole images from the start
    assert background_share(10, 100, 0.4, start=0.2) == pytest.approx(0.2 + 0.8 * 10 / 40)
    with pytest.raises(ValueError, match="ramp"):
        background_share(0, 100, 1.5)


def test_keep_mask_keeps_every_content_cell(grid_batch) -> None:
    _, _, labels = grid_batch
    content = (labels[..., 0] > 0) | (labels[..., 1] > 0)
    none = keep_mask(labels, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none, content)
    assert keep_mask(labels, 1.0, torch.Generator().manual_seed(0)).all()
    half = keep_mask(labels, 0.5, torch.Generator().manual_seed(0))
    assert (half >= content).all() and content.sum() < half.sum() < labels.shape[0] * labels.shape[1]
    assert torch.equal(half, keep_mask(labels, 0.5, torch.Generator().manual_seed(0)))


def test_reduced_inputs_match_the_stock_forward(grid_batch) -> None:
    model, batch, labels = grid_batch
    with torch.no_grad():
        feats = image_features(model, batch["pixel_values"])
        stock = model(**batch)
        every = model(**reduced_inputs(model, batch, feats, torch.ones(3, 256, dtype=torch.bool)))
        valid = batch["attention_mask"].bool()
        assert torch.allclose(stock.logits[valid], every.logits[valid], atol=1e-5)
        assert float(stock.loss) == pytest.approx(float(every.loss), abs=1e-6)
        keep = keep_mask(labels, 0.0, torch.Generator().manual_seed(0))
        red = reduced_inputs(model, batch, feats, keep)
    image = batch["input_ids"] == model.config.image_token_id
    for b in range(3):
        n_text = int((valid[b] & ~image[b]).sum())
        n = int(red["attention_mask"][b].sum())
        assert n == n_text + int(keep[b].sum())
        # positions are the original indices: the kept image cells' offsets from the first placeholder
        pos = red["position_ids"][b, :n]
        first = int(image[b].nonzero()[0])
        vis = pos[(pos >= first) & (pos < first + 256)] - first
        assert torch.equal(vis, keep[b].nonzero().squeeze(1))
        # the answer labels survive unchanged, in order
        want = batch["labels"][b][batch["labels"][b] != IGNORE]
        assert torch.equal(red["labels"][b][red["labels"][b] != IGNORE], want)
        # a kept visual token's embedding is its projected feature
        cell = int(keep[b].nonzero()[0])
        at = int((pos == first + cell).nonzero()[0])
        assert torch.allclose(red["inputs_embeds"][b, at], feats[b, cell])
    with pytest.raises(ValueError, match="placeholders"):
        reduced_inputs(model, batch, feats[:, :10], keep[:, :10])


def test_curriculum_training_resumes_exactly(tmp_path) -> None:
    torch.set_num_threads(1)
    args = dict(size=GRID, steps=4, batch_size=4, lr=5e-3, warmup=0, seed=0, eval_every=0, dense_weight=0.5,
                attention_weight=0.0, curriculum=0.5, log=lambda s: None)
    full = train("testbed-llava", work_dir=tmp_path / "full", **args)
    train("testbed-llava", work_dir=tmp_path / "part", until=1, **args)
    rest = train("testbed-llava", work_dir=tmp_path / "part", resume=True, **args)
    assert rest["losses"] == full["losses"] and len(full["losses"]) == 4
    plain = train("testbed-llava", work_dir=tmp_path / "plain", **{**args, "curriculum": 0.0})
    assert plain["losses"][0] != full["losses"][0]  # step 0 sees only content tokens under the curriculum
    with pytest.raises(ValueError, match="dense_weight"):
        train("testbed-llava", work_dir=tmp_path / "bad", **{**args, "dense_weight": 0.0})
