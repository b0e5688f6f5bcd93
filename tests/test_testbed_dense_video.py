"""Dense targets of the video items: cell classes per video token and the event tokens of the key frames."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset, families  # noqa: E402
from mmtok.testbed.data.videos import CELL, VIDEO_FRAMES, VIDEO_SIZE  # noqa: E402
from mmtok.testbed.dense import COLOUR_CLASSES, SHAPE_CLASSES  # noqa: E402
from mmtok.testbed.dense_video import (  # noqa: E402
    APPEARANCE_COLUMN,
    APPEARANCE_WORDS,
    MOTION_COLUMN,
    MOTION_WORDS,
    appearance_terms,
    appearance_words,
    motion_terms,
    motion_words,
    time_terms,
    time_words,
    video_batch_labels,
    video_cell_appearance,
    video_cell_labels,
    video_cell_motion,
    video_key_cells,
)
from mmtok.testbed.models import get_spec  # noqa: E402

G = VIDEO_SIZE // CELL
KEY, ORDER = -2, -1  # the flag columns of video_batch_labels


def _scene(key):
    red = {"id": 0, "colour": "red", "shape": "circle"}
    blue = {"id": 1, "colour": "blue", "shape": "square", "box": [30, 30, 48, 48]}  # cell (1, 1), never changes
    left, right = {**red, "box": [2, 2, 20, 20]}, {**red, "box": [30, 2, 48, 20]}  # cells (0, 0) and (0, 1)
    return {"size": 56, "frames": [[left, blue], [left, blue], [right, blue], [right, blue]], "query": {"key": key}}


def test_video_cell_labels_known_answer() -> None:
    lab = video_cell_labels(_scene([2, 3]))
    assert lab.shape == (2 * 4, 3)
    named = {(i // 4, i % 4): (COLOUR_CLASSES[int(c)], SHAPE_CLASSES[int(s)]) for i, (c, s, _) in enumerate(lab)
             if c or s}
    assert named == {(0, 0): ("red", "circle"), (0, 3): ("blue", "square"), (1, 1): ("red", "circle"),
                     (1, 3): ("blue", "square")}
    assert int(lab[:, 2].abs().sum()) == 0
    with pytest.raises(ValueError, match="grid"):
        video_cell_labels({**_scene([0]), "size": 50})


def test_video_key_cells_mark_the_events_of_the_key_patches() -> None:
    # the move happens at patch 1: the cell it left and the cell it entered; the static blue square never
    assert video_key_cells(_scene([2, 3])).reshape(2, 4).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    # at patch 0 only the object about to move is an event
    assert video_key_cells(_scene([0, 1])).reshape(2, 4).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


def test_every_generated_video_question_has_event_tokens() -> None:
    items = list(dataset("video", "train", 3 * len(families("video")), form="mixed"))
    labels = video_batch_labels(items)
    assert labels.shape == (len(items), VIDEO_FRAMES // 2 * G * G, 7)
    for it, lab in zip(items, labels, strict=True):
        assert int(lab[:, KEY].sum()) >= 1, it.family
        patches = {int(i) // (G * G) for i in lab[:, KEY].nonzero()}
        assert patches <= {f // 2 for f in it.scene["query"]["key"]}
        assert lab[:, MOTION_COLUMN].tolist() == video_cell_motion(it.scene).tolist()
        assert lab[:, APPEARANCE_COLUMN].tolist() == video_cell_appearance(it.scene).tolist()
        if it.family in ("first", "last", "moved", "direction", "flash_count"):  # the answer attends to its object
            events = video_key_cells(it.scene, frames=it.scene["query"]["answer_key"])
            assert set(lab[:, ORDER].nonzero()[:, 0].tolist()) <= set((events * (lab[:, 1] > 0)).nonzero()[:, 0].tolist())
            assert int(lab[:, ORDER].sum()) >= 1
        else:
            assert int(lab[:, ORDER].abs().sum()) == 0


def test_first_and_last_point_the_answer_at_its_appearance() -> None:
    for family in ("first", "last"):
        for it in dataset("video", "train", 4, 3, families=[family], form="mixed"):
            lab = video_batch_labels([it])[0]
            marked = lab[:, ORDER].nonzero()[:, 0]
            assert len(marked) == 1 and int(lab[marked[0], KEY]) == 1  # one token, one of the key events
            patch, cell = divmod(int(marked[0]), G * G)
            frame = it.scene["frames"][2 * patch]
            (obj,) = [o for o in frame if (((o["box"][1] + o["box"][3]) // 2) // CELL * G
                                           + ((o["box"][0] + o["box"][2]) // 2) // CELL) == cell]
            assert f"{obj['colour']} {obj['shape']}" == it.answer
            # it is the answer's first frame: it was not there one patch before
            before = it.scene["frames"][2 * patch - 2] if patch else []
            assert all(o["id"] != obj["id"] for o in before)
    with pytest.raises(ValueError, match="video"):
        video_batch_labels(list(dataset("image", "train", 1)))


def test_qwen_video_token_order_is_patch_row_column() -> None:
    torch.set_num_threads(1)
    _, processor = get_spec("testbed-qwen2vl").build("full")
    patch, row, col = 3, 5, 7
    frames = [np.full((VIDEO_SIZE, VIDEO_SIZE, 3), 128, np.uint8) for _ in range(VIDEO_FRAMES)]
    for f in (2 * patch, 2 * patch + 1):
        frames[f][row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = (230, 20, 20)
    out = processor.video_processor(videos=[[Image.fromarray(f) for f in frames]], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[VIDEO_FRAMES // 2, 2 * G, 2 * G]]
    per_token = out["pixel_values_videos"].reshape(VIDEO_FRAMES // 2 * G * G, -1)
    deviation = (per_token - per_token[0]).abs().mean(1)
    assert int(deviation.argmax()) == patch * G * G + row * G + col
    assert float(deviation.sort().values[-2]) < 0.25 * float(deviation.max())


def test_time_terms_known_answer() -> None:
    words = [10 + p for p in range(8)]
    per_patch = G * G
    # row 0: a video whose tokens 0 (patch 0) and 3 * per_patch + 5 (patch 3) sit at positions 1 and 2;
    # row 1: an image row, left out
    cells = torch.tensor([[-1, 0, 3 * per_patch + 5], [-1, 0, 1]])
    rows = torch.tensor([True, False])
    logits = torch.zeros(2, 3, 20)
    logits[0, 1, 10] = 2.0  # names patch 0: right
    logits[0, 2, 11] = 2.0  # names patch 1, the token is in patch 3: wrong
    total, count = time_terms(logits, cells, rows, words)
    right = -torch.log_softmax(torch.tensor([2.0] + [0.0] * 7), 0)[0]
    wrong = -torch.log_softmax(torch.tensor([0.0, 2.0] + [0.0] * 6), 0)[3]
    assert count == 2 and torch.allclose(total, right + wrong)
    assert time_terms(logits, cells, torch.tensor([False, False]), words)[1] == 0


def test_time_words_are_the_digits() -> None:
    _, processor = get_spec("testbed-qwen2vl").build("tiny")
    ids = time_words(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(ids) == [str(p) for p in range(1, 9)]


def test_moved_points_the_answer_at_the_mover_only() -> None:
    for it in dataset("video", "train", 4, 3, families=["moved"], form="mixed"):
        lab = video_batch_labels([it])[0]
        marked = lab[:, ORDER].nonzero()[:, 0]
        assert len(marked) >= 2  # where it rested before the move and where it went
        assert (lab[marked, KEY] == 1).all()  # key events, each showing the mover (colour and shape classes)
        colour, shape = it.answer.split()
        assert {(COLOUR_CLASSES[int(lab[i, 0])], SHAPE_CLASSES[int(lab[i, 1])]) for i in marked} == {(colour, shape)}
        # the cells it left empty are key events but not marked
        assert bool(((lab[:, KEY] == 1) & (lab[:, 1] == 0)).any())


def test_video_cell_motion_known_answer() -> None:
    # the red circle is on its way right in patch 0's second frame, then in its new cell at patch 1; the blue
    # square stays; cells without an object have no class
    red = {"id": 0, "colour": "red", "shape": "circle"}
    blue = {"id": 1, "colour": "blue", "shape": "square", "box": [30, 30, 48, 48]}
    start, on_way, end = {**red, "box": [2, 2, 20, 20]}, {**red, "box": [12, 2, 30, 20]}, {**red, "box": [30, 2, 48, 20]}
    scene = {"size": 56, "frames": [[start, blue], [on_way, blue], [end, blue], [end, blue]], "query": {"key": []}}
    motion = video_cell_motion(scene).reshape(2, 4)
    assert motion.tolist() == [[2, -1, -1, 0], [-1, 0, -1, 0]]
    assert MOTION_WORDS[2] == "right"
    # a shift up 10 px and left 4: "up"; a diagonal shift as long on both axes has no class, nor has an
    # object missing from the patch's second frame
    size = 4 * CELL

    def at(r, c, i, dx=0, dy=0):
        x, y = c * CELL + 4 + dx, r * CELL + 4 + dy
        return {"id": i, "colour": "red", "shape": "circle", "box": [x, y, x + 18, y + 18]}
    frames = [[at(3, 1, 0), at(1, 1, 1), at(0, 3, 2)], [at(3, 1, 0, -4, -10), at(1, 1, 1, 10, 10)]] * 2
    motion = video_cell_motion({"size": size, "frames": frames, "query": {"key": []}}).reshape(2, 4, 4)
    assert int(motion[0, 3, 1]) == MOTION_WORDS.index("up")
    assert int(motion[0, 1, 1]) == -1 and int(motion[0, 0, 3]) == -1
    assert int((motion[0] >= 0).sum()) == 1


def test_generated_movers_show_their_direction_in_the_patches_before_their_steps() -> None:
    for it in dataset("video", "train", 5, 4, families=["direction"], form="mixed"):
        motion = video_cell_motion(it.scene).reshape(-1, G * G)
        objects = video_cell_labels(it.scene)[:, 1].reshape(-1, G * G)
        moving = (motion > 0).sum(1)
        # both movers show their direction in 1-2 patches each; every other object token is still
        assert 2 <= int(moving.sum()) <= 4
        assert int((motion == 0).sum()) == int((objects > 0).sum()) - int(moving.sum())
        assert {MOTION_WORDS[int(m)] for m in motion[motion > 0]} >= {it.answer}


def test_direction_points_the_answer_at_the_named_mover_and_its_steps_name_the_answer() -> None:
    for it in dataset("video", "train", 6, 5, families=["direction"], form="mixed"):
        lab = video_batch_labels([it])[0]
        marked = lab[:, ORDER].nonzero()[:, 0]
        colour, shape = re.search(r"did the (\w+) (\w+) move", it.question).groups()
        assert {(COLOUR_CLASSES[int(lab[i, 0])], SHAPE_CLASSES[int(lab[i, 1])]) for i in marked} == {(colour, shape)}
        # only its tokens on its way, each showing the answer's direction
        assert {MOTION_WORDS[int(m)] for m in lab[marked, MOTION_COLUMN]} == {it.answer}
        # the other mover's steps are not marked
        assert bool(((lab[:, MOTION_COLUMN] > 0) & (lab[:, ORDER] == 0)).any())


def test_motion_terms_known_answer() -> None:
    words = [10, 11, 12, 13, 14]
    # row 0: a video whose media tokens 2 (still) and 0 (moved "up") sit at positions 1 and 2, token 1 (no
    # object) at position 0; row 1: another row whose token 0 is still, at position 2
    cells = torch.tensor([[1, 2, 0], [-1, -1, 0]])
    motion = torch.tensor([[3, -1, 0], [0, -1, -1]])
    logits = torch.zeros(2, 3, 20)
    logits[0, 1, 10] = 1.0  # still, says "no": right
    logits[0, 2, 11] = 2.0  # moved up, says "left": wrong
    sums, counts = motion_terms(logits, cells, motion, words)
    still = -torch.log_softmax(torch.tensor([1.0, 0, 0, 0, 0]), 0)[0] - torch.log_softmax(torch.zeros(5), 0)[0]
    moved = -torch.log_softmax(torch.tensor([0, 2.0, 0, 0, 0]), 0)[3]
    assert counts.tolist() == [2, 1]
    assert torch.allclose(sums, torch.stack([still, moved]))


def test_motion_words_are_no_and_the_directions() -> None:
    _, processor = get_spec("testbed-qwen2vl").build("tiny")
    ids = motion_words(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(ids) == ["no", "left", "right", "up", "down"]


def test_video_cell_appearance_known_answer() -> None:
    # the red circle is in view in patches 0, 2-3 and 5 (the 2nd frame of each patch as its 1st), the blue
    # square throughout; its 5th appearance would be past the words
    red = {"id": 0, "colour": "red", "shape": "circle", "box": [2, 2, 20, 20]}  # cell (0, 0)
    blue = {"id": 1, "colour": "blue", "shape": "square", "box": [30, 30, 48, 48]}  # cell (1, 1)
    shown = [0, 2, 3, 5]
    frames = [[red, blue] if t // 2 in shown else [blue] for t in range(12)]
    runs = video_cell_appearance({"size": 56, "frames": frames, "query": {"key": []}}).reshape(6, 4)
    assert runs[:, 0].tolist() == [0, -1, 1, 1, -1, 2]
    assert runs[:, 3].tolist() == [0] * 6 and (runs[:, 1:3] == -1).all()
    assert APPEARANCE_WORDS[2] == "3"
    often = [[red, blue] if t // 2 % 2 == 0 else [blue] for t in range(20)]  # 5 appearances in 10 patches
    runs = video_cell_appearance({"size": 56, "frames": often, "query": {"key": []}}).reshape(10, 4)
    assert runs[:, 0].tolist() == [0, -1, 1, -1, 2, -1, 3, -1, -1, -1]


def test_flash_count_points_the_answer_at_the_named_objects_last_flash() -> None:
    for it in dataset("video", "train", 8, 6, families=["flash_count"], form="mixed"):
        lab = video_batch_labels([it])[0]
        marked = lab[:, ORDER].nonzero()[:, 0]
        assert len(marked) > 0
        colour, shape = re.search(r"did the (\w+) (\w+) flash", it.question).groups()
        assert {(COLOUR_CLASSES[int(lab[i, 0])], SHAPE_CLASSES[int(lab[i, 1])]) for i in marked} == {(colour, shape)}
        # each marked token is on the named object's last appearance: its class is the answer
        assert {APPEARANCE_WORDS[int(a)] for a in lab[marked, APPEARANCE_COLUMN]} == {it.answer}
        # and all of that flash's patches are marked (1 or 2 patches of the object's cells)
        patches = {int(i) // (G * G) for i in marked}
        assert len(patches) in (1, 2) and max(patches) - min(patches) == len(patches) - 1


def test_appearance_terms_known_answer() -> None:
    words = [10, 11, 12, 13]
    # row 0: media tokens 0 (1st appearance) and 2 (3rd) at positions 0 and 2, token 1 (no object) at 1
    cells = torch.tensor([[0, 1, 2]])
    runs = torch.tensor([[0, -1, 2]])
    logits = torch.zeros(1, 3, 20)
    logits[0, 0, 10] = 3.0  # says "1": right
    logits[0, 2, 11] = 1.0  # says "2": wrong
    sums, counts = appearance_terms(logits, cells, runs, words)
    assert counts.tolist() == [1, 0, 1, 0]
    first = -torch.log_softmax(torch.tensor([3.0, 0, 0, 0]), 0)[0]
    third = -torch.log_softmax(torch.tensor([0, 1.0, 0, 0]), 0)[2]
    assert torch.allclose(sums, torch.stack([first, torch.tensor(0.0), third, torch.tensor(0.0)]))


def test_appearance_words_are_the_flash_counts() -> None:
    _, processor = get_spec("testbed-qwen2vl").build("tiny")
    ids = appearance_words(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4"]
