"""Image tokens on the scenes' layout grid: which token covers which cell, and inputs equal to the stock forward."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset  # noqa: E402
from mmtok.testbed.data.images import CELL, IMAGE_SIZE  # noqa: E402
from mmtok.testbed.dense import batch_labels  # noqa: E402
from mmtok.testbed.media_grid import GridBatch, grid_inputs, model_kind, on_layout_grid  # noqa: E402
from mmtok.testbed.models import Size, encode_items, get_spec  # noqa: E402
from mmtok.testbed.train import train  # noqa: E402

G = IMAGE_SIZE // CELL
# The shipped Qwen2-VL geometry (448 px, 14 px patches, 2 x 2 merge: 16 x 16 tokens) with small widths.
QWEN_GRID = Size(image_size=448, video_size=336, patch_size=14, merge_size=2, vision_hidden=32, vision_layers=1,
                 vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, mlp_ratio=2)

AUDIO_SMALL = Size(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2,
                   text_kv_heads=1, mlp_ratio=2)


@pytest.fixture(scope="module")
def qwen():
    torch.set_num_threads(1)
    model, processor = get_spec("testbed-qwen2vl").build(QWEN_GRID, 0)
    return model.eval(), processor


def test_grid_geometry_of_the_specs(qwen) -> None:
    model, _ = qwen
    assert model_kind(model) == "qwen2vl" and on_layout_grid(model, QWEN_GRID)
    llava = get_spec("testbed-llava")
    assert on_layout_grid(llava.build("tiny")[0], llava.sizes["full"])
    assert not on_layout_grid(model, get_spec("testbed-qwen2vl").sizes["tiny"])  # 2 x 2 tokens, not 16 x 16
    assert on_layout_grid(model, get_spec("testbed-qwen2vl").sizes["full"])
    assert model_kind(torch.nn.Linear(2, 2)) is None
    assert model_kind(get_spec("testbed-audio").build("tiny")[0]) == "qwen2audio"
    assert not on_layout_grid(model, replace(QWEN_GRID, video_size=56))  # 2 x 2 video tokens per patch


def test_qwen_merged_token_k_covers_cell_k(qwen) -> None:
    _, processor = qwen
    row, col = 3, 10
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = (230, 20, 20)
    out = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 2 * G, 2 * G]]
    # Each merged token is four consecutive patch rows; the red cell must dominate exactly one token's.
    per_token = out["pixel_values"].reshape(G * G, -1)
    background = per_token[0]
    deviation = (per_token - background).abs().mean(1)
    assert int(deviation.argmax()) == row * G + col
    assert float(deviation.sort().values[-2]) < 0.25 * float(deviation.max())


def test_qwen_grid_inputs_equal_the_stock_forward(qwen) -> None:
    model, processor = qwen
    items = list(dataset("image", "train", 2, form="mixed")) + list(dataset("video", "train", 1, form="mixed"))
    batch = encode_items(processor, items)
    grid = grid_inputs(model, batch)
    assert grid.tokens["image"].shape == (2, G * G, 32) and grid.rows["image"].tolist() == [True, True, False]
    m = int((batch["input_ids"][2] == model.config.video_token_id).sum())
    assert grid.tokens["video"].shape == (1, m, 32) and grid.rows["video"].tolist() == [False, False, True]
    with torch.no_grad():
        want = model(**batch).logits
        got = model(**grid.inputs).logits
    assert torch.allclose(got, want, atol=1e-5)
    image = batch["input_ids"] == model.config.image_token_id
    video = batch["input_ids"] == model.config.video_token_id
    assert (grid.cells[image] == torch.arange(G * G).repeat(2)).all()
    assert (grid.cells[video] == torch.arange(m)).all() and (grid.cells[~image & ~video] == -1).all()
    with pytest.raises(ValueError, match="curriculum"):
        grid_inputs(model, batch, keep=torch.ones(2, G * G, dtype=torch.bool))
    with pytest.raises(ValueError, match="Llava, Qwen2-VL or Qwen2-Audio"):
        grid_inputs(torch.nn.Linear(2, 2), batch)


def test_audio_grid_tokens_are_the_projected_features_the_model_receives() -> None:
    torch.set_num_threads(1)
    model, processor = get_spec("testbed-audio").build(AUDIO_SMALL, 0)
    model.eval()
    batch = encode_items(processor, list(dataset("audio", "train", 2, form="mixed")))
    grid = grid_inputs(model, batch)
    n = int((batch["input_ids"][0] == model.config.audio_token_id).sum())
    with torch.no_grad(), grid.capturing():
        got = model(**grid.inputs, output_hidden_states=True)
    assert grid.tokens["audio"].shape == (2, n, 32)
    audio = batch["input_ids"] == model.config.audio_token_id
    # the captured tokens are the embeddings the language model got at the audio positions
    assert torch.allclose(got.hidden_states[0][audio], grid.tokens["audio"].reshape(-1, 32))
    assert (grid.cells[audio] == torch.arange(n).repeat(2)).all() and (grid.cells[~audio] == -1).all()


def test_per_row_places_each_media_s_labels_on_its_rows() -> None:
    labels = batch_labels(list(dataset("image", "train", 2, form="mixed")), CELL)
    grid = GridBatch({}, {}, torch.zeros(4, 1), {"image": torch.tensor([False, True, False, True]),
                                                 "video": torch.tensor([True, False, False, False])})
    key = grid.per_row({"image": labels[..., -2]})
    assert key.shape == (4, G * G) and (key[1] == labels[0, :, -2]).all() and (key[3] == labels[1, :, -2]).all()
    assert int(key[0].abs().sum()) == 0 and int(key[2].abs().sum()) == 0
    columns = labels.shape[-1]
    video = torch.ones(1, 3 * G * G, columns, dtype=torch.long)
    both = grid.per_row({"image": labels, "video": video})
    assert both.shape == (4, 3 * G * G, columns) and int(both[0].sum()) == 3 * G * G * columns
    assert (both[1, :G * G] == labels[0]).all() and int(both[1, G * G:].abs().sum()) == 0
    with pytest.raises(ValueError, match="columns"):
        grid.per_row({"image": labels, "video": video[..., :3]})


def _dense_args(size):
    return dict(size=size, steps=6, batch_size=4, lr=1e-2, warmup=0, seed=0, eval_every=0, dense_weight=1.0,
                attention_weight=1.0, curriculum=0.0, log=lambda s: None)


@pytest.mark.parametrize("name", ["testbed-qwen2vl", "testbed-audio"])
def test_dense_training_lowers_the_probe_loss(tmp_path, name) -> None:
    torch.set_num_threads(1)
    run = train(name, work_dir=tmp_path / "run", **_dense_args(QWEN_GRID if name == "testbed-qwen2vl" else AUDIO_SMALL))
    dense = run["dense_losses"]
    assert len(dense) == 6 and all(np.isfinite(dense)) and dense[-1] < dense[0]


def test_qwen_dense_training_refuses_the_curriculum_and_off_grid_sizes(tmp_path) -> None:
    args = _dense_args(QWEN_GRID)
    with pytest.raises(ValueError, match="curriculum"):
        train("testbed-qwen2vl", work_dir=tmp_path / "c", **{**args, "curriculum": 0.5})
    with pytest.raises(ValueError, match="layout cell"):
        train("testbed-qwen2vl", work_dir=tmp_path / "t", **{**args, "size": "tiny"})
