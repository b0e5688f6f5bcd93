"""Dense targets of the audio items (40 ms tokens) and dense training of the audio testbed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset, families  # noqa: E402
from mmtok.testbed.dense_audio import (  # noqa: E402
    KIND_CLASSES,
    TOKEN_MS,
    audio_batch_labels,
    audio_key_tokens,
    audio_token_labels,
)
from mmtok.testbed.media_grid import grid_inputs  # noqa: E402
from mmtok.testbed.models import Size, encode_items, get_spec  # noqa: E402
from mmtok.testbed.train import train  # noqa: E402


def _scene():
    tone = {"kind": "tone", "start_ms": 50, "dur_ms": 60}  # covers 30 ms of token 1 and 30 ms of token 2
    chirp = {"kind": "chirp", "start_ms": 170, "dur_ms": 15}  # 15 ms of token 4: too little to label it
    return {"duration_ms": 240, "events": [tone, chirp], "query": {"key": [[50, 110], [170, 185]]}}


def test_audio_token_labels_known_answer() -> None:
    kinds = [KIND_CLASSES[int(k)] for k in audio_token_labels(_scene())]
    assert kinds == ["none", "tone", "tone", "none", "none", "none"]
    long_chirp = {**_scene(), "events": [{"kind": "chirp", "start_ms": 80, "dur_ms": 81}]}
    assert [KIND_CLASSES[int(k)] for k in audio_token_labels(long_chirp)] == ["none", "none", "chirp", "chirp",
                                                                              "none", "none"]
    with pytest.raises(ValueError, match="whole number"):
        audio_token_labels({**_scene(), "duration_ms": 250})


def test_audio_key_tokens_cover_every_overlapping_token() -> None:
    assert audio_key_tokens(_scene()).tolist() == [0, 1, 1, 0, 1, 0]


def test_generated_audio_targets_match_their_events() -> None:
    items = list(dataset("audio", "train", 2 * len(families("audio")), form="mixed"))
    labels = audio_batch_labels(items)
    n = items[0].scene["duration_ms"] // TOKEN_MS
    assert labels.shape == (len(items), n, 3)
    for it, lab in zip(items, labels, strict=True):
        events = it.scene["events"]
        assert int((lab[:, 0] > 0).sum()) >= sum(ev["dur_ms"] // TOKEN_MS - 1 for ev in events)
        assert int(lab[:, 1].sum()) >= 1 and int(lab[:, 2].abs().sum()) == 0
    with pytest.raises(ValueError, match="audio"):
        audio_batch_labels(list(dataset("image", "train", 1)))


AUDIO_SMALL = Size(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2,
                   text_kv_heads=1, mlp_ratio=2)


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


def test_audio_dense_training_lowers_the_probe_loss(tmp_path) -> None:
    torch.set_num_threads(1)
    args = dict(size=AUDIO_SMALL, steps=6, batch_size=4, lr=1e-2, warmup=0, seed=0, eval_every=0, dense_weight=1.0,
                attention_weight=1.0, curriculum=0.0, log=lambda s: None)
    run = train("testbed-audio", work_dir=tmp_path / "a", **args)
    dense = run["dense_losses"]
    assert len(dense) == 6 and all(np.isfinite(dense)) and dense[-1] < dense[0]
