"""Dense targets of the audio items (40 ms tokens) and dense training of the audio testbed."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset, families  # noqa: E402
from mmtok.testbed.dense_audio import (  # noqa: E402
    KIND_CLASSES,
    TOKEN_MS,
    audio_batch_labels,
    audio_key_tokens,
    audio_token_labels,
)


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
