"""The testbed QA generator: determinism, split disjointness, answer correctness per the checker, vocabulary."""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmtok.testbed import data as D
from mmtok.testbed.data import check as C
from mmtok.testbed.data.audio import SAMPLE_RATE, render_audio
from mmtok.testbed.data.images import draw_shape, render_image
from mmtok.testbed.data.items import SHAPES, fingerprint, split_of, words
from mmtok.testbed.data.videos import CELL as VIDEO_CELL
from mmtok.testbed.data.videos import MOTION_SHIFT, TEMPORAL, VIDEO_FRAMES, VIDEO_SIZE, motion_shift

ALL = [(m, f) for m in D.MODALITIES for f in D.families(m)]


@functools.cache
def items(modality: str, family: str, split: str, n: int, seed: int = 0) -> tuple[D.QAItem, ...]:
    return tuple(D.item(modality, split, i, seed, family=family) for i in range(n))


def media_bytes(it: D.QAItem) -> bytes:
    if it.modality == "image":
        return it.media.tobytes()
    if it.modality == "video":
        return b"".join(f.tobytes() for f in it.media)
    return it.media.tobytes()


def test_families_cover_the_issue() -> None:
    assert len(D.families("image")) >= 8
    assert len(D.families("video")) >= 6
    assert len(D.families("audio")) >= 4
    names = [f for _, f in ALL]
    assert len(names) == len(set(names))
    for _, fam in ALL:
        info = D.family_info(fam)
        assert 0 < D.chance(fam) <= 0.5
        assert D.chance(fam, "mc") == pytest.approx(1 / info.n_choices)
        assert info.description


def test_chance_matches_the_answer_space() -> None:
    assert D.chance("count") == pytest.approx(1 / 6)
    assert D.chance("exists") == 0.5
    assert D.chance("inside") == pytest.approx(1 / 35)
    assert D.chance("when", "mc") == pytest.approx(1 / 3)
    assert D.chance("position") == pytest.approx(0.5 / 7 + 0.5 / 5)


@pytest.mark.parametrize("modality", D.MODALITIES)
def test_same_arguments_same_item(modality: str) -> None:
    for i in range(len(D.families(modality))):
        a, b = D.item(modality, "train", i, 3), D.item(modality, "train", i, 3)
        assert media_bytes(a) == media_bytes(b)
        assert (a.question, a.answer, a.choices, a.family) == (b.question, b.answer, b.choices, b.family)
        assert a.scene == b.scene
        c = D.item(modality, "train", i, 4)
        assert media_bytes(c) != media_bytes(a)


def test_dataset_matches_item_and_families_take_turns() -> None:
    fams = D.families("image")
    got = list(D.dataset("image", "test", n=len(fams) + 2, seed=1))
    assert [it.family for it in got] == fams + fams[:2]
    for i, it in enumerate(got):
        ref = D.item("image", "test", i // len(fams), 1, family=fams[i % len(fams)])
        assert media_bytes(it) == media_bytes(ref) and it.question == ref.question
    sub = list(D.dataset("video", "train", n=4, seed=0, families=["when", "moved"], start=2))
    assert [it.family for it in sub] == ["when", "moved", "when", "moved"]
    assert sub[0].question == D.item("video", "train", 1, 0, family="when").question


def test_forms() -> None:
    short = D.item("image", "train", 0, 0, family="count")
    mc = D.item("image", "train", 0, 0, family="count", form="mc")
    assert short.prompt == short.question and short.target == short.answer
    assert mc.prompt.startswith(mc.question + " options : ")
    assert mc.prompt.endswith(" , ".join(mc.choices)) and mc.choices[mc.answer_index] == mc.answer
    assert media_bytes(short) == media_bytes(mc)  # the form changes the prompt only
    mixed = [it.form for it in D.dataset("audio", "train", n=10, form="mixed", families=["chirp"])]
    assert mixed == ["short", "mc"] * 5


@pytest.mark.parametrize(("modality", "family"), ALL)
def test_splits_are_disjoint(modality: str, family: str) -> None:
    train, test = items(modality, family, "train", 25), items(modality, family, "test", 25)
    assert all(split_of(it.scene) == "train" for it in train)
    assert all(split_of(it.scene) == "test" for it in test)
    assert not {fingerprint(it.scene) for it in train} & {fingerprint(it.scene) for it in test}
    digest = lambda it: hashlib.sha256(media_bytes(it)).hexdigest()  # noqa: E731
    assert not {digest(it) for it in train} & {digest(it) for it in test}


@pytest.mark.parametrize(("modality", "family"), ALL)
def test_checker_agrees_with_every_answer(modality: str, family: str) -> None:
    n_media = 12 if modality == "video" else 25
    for split in D.SPLITS:
        for i, it in enumerate(items(modality, family, split, 25)):
            res = C.check(it, media=i < n_media)
            assert res.ok, (split, i, it.question, it.answer, res.problems)
            assert res.scene_answer == it.answer
            if i < n_media:
                assert res.media_answer == it.answer


@pytest.mark.parametrize("modality", D.MODALITIES)
def test_answers_are_balanced(modality: str) -> None:
    for family in D.families(modality):
        answers = [it.answer for it in items(modality, family, "train", 25) + items(modality, family, "test", 25)]
        top = max(answers.count(a) for a in set(answers))
        limit = 0.75 if D.family_info(family).n_choices == 2 else 0.5
        assert top / len(answers) <= limit, (family, top)


@pytest.mark.parametrize("modality", D.MODALITIES)
def test_vocabulary_covers_all_text(modality: str) -> None:
    vocab = set(D.vocabulary(modality))
    assert set(D.vocabulary()) >= vocab and len(D.vocabulary()) < 150
    for family in D.families(modality):
        for it in items(modality, family, "train", 25):
            assert set(it.text_words()) <= vocab, it.question
            mc = dataclasses.replace(it, form="mc")
            assert set(words(mc.prompt)) <= vocab


def test_words_match_the_hf_whitespace_pretokenizer() -> None:
    pre = pytest.importorskip("tokenizers.pre_tokenizers")
    for it in D.dataset("video", "train", n=7, form="mc"):
        assert [w for w, _ in pre.Whitespace().pre_tokenize_str(it.prompt)] == words(it.prompt)


def test_media_formats_and_keys() -> None:
    img = D.item("image", "train", 0)
    assert isinstance(img.media, Image.Image) and img.media.mode == "RGB" and img.media.size == (336, 336)
    vid = D.item("video", "train", 0)
    assert len(vid.media) == 16 and all(f.size == (336, 336) and f.mode == "RGB" for f in vid.media)
    assert vid.fps == 4.0 and vid.sample_rate is None
    aud = D.item("audio", "train", 0)
    assert aud.media.dtype == np.float32 and aud.media.shape == (3 * SAMPLE_RATE,) and aud.sample_rate == SAMPLE_RATE
    assert np.abs(aud.media).max() <= 1.0
    for modality, family in ALL:
        key = items(modality, family, "train", 25)[0].scene["query"]["key"]
        assert isinstance(key, list)


def test_key_objects_are_small_and_spread_out() -> None:
    centres = []
    for it in items("image", "inside", "train", 25) + items("image", "exists", "train", 25):
        for o in it.scene["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 11 <= x1 - x0 <= 17 and x1 - x0 == y1 - y0
        for x0, y0, x1, y1 in it.scene["query"]["key"]:
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    xs, ys = np.array(centres).T
    assert xs.min() < 84 and xs.max() > 252 and ys.min() < 84 and ys.max() > 252


def test_video_objects_sit_in_whole_cells_and_events_in_whole_temporal_patches() -> None:
    c = VIDEO_CELL
    for family in D.families("video"):
        for it in items("video", family, "train", 25)[:12]:
            tracks: dict[int, list[tuple[str, tuple[int, ...]] | None]] = {}
            for t, objs in enumerate(it.scene["frames"]):
                cells, boxes = [], []
                for o in objs:
                    x0, y0, x1, y1 = o["box"]
                    assert 17 <= x1 - x0 <= c - 4 and x1 - x0 == y1 - y0, (family, o)
                    boxes.append(o["box"])
                    tracks.setdefault(o["id"], [None] * VIDEO_FRAMES)[t] = (o["colour"], tuple(o["box"]))
                    if t % TEMPORAL:
                        continue  # a mover's second frame may be on its way (checked below)
                    # One cell, centred: >= 2 px to its edges, so neighbours keep the 4 px gap.
                    assert (x0 // c, y0 // c) == ((x1 - 1) // c, (y1 - 1) // c), (family, t, o)
                    assert x0 % c >= 2 and y0 % c >= 2 and c - (x1 - 1) % c > 2 and c - (y1 - 1) % c > 2
                    cells.append((x0 // c, y0 // c))
                assert len(cells) == len(set(cells)), (family, t)
                for i, a in enumerate(boxes):  # no two objects overlap, shifted or not
                    for b in boxes[i + 1:]:
                        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (family, t, a, b)
            for states in tracks.values():
                for p in range(0, VIDEO_FRAMES, TEMPORAL):
                    one, two = states[p], states[p + 1]
                    # Same visibility and colour in both frames of each temporal patch: every event starts on
                    # an even frame and lasts whole patches; the box too, but for a mover on its way to its
                    # next patch's cell, whose centre stays in its cell.
                    assert (one is None) == (two is None) and (one is None or one[0] == two[0]), (family, states)
                    if one is None or one[1] == two[1]:
                        continue
                    assert family in ("moved", "direction"), (family, states)
                    nxt = states[p + TEMPORAL]
                    step = ((nxt[1][0] - one[1][0]) // c, (nxt[1][1] - one[1][1]) // c)
                    assert (two[1][0] - one[1][0], two[1][1] - one[1][1]) == motion_shift(*step) != (0, 0)
                    assert max(abs(two[1][0] - one[1][0]), abs(two[1][1] - one[1][1])) == MOTION_SHIFT
                boxes = [s[1] for t, s in enumerate(states) if s is not None and t % TEMPORAL == 0]
                for a, b in zip(boxes, boxes[1:], strict=False):  # from patch to patch, a move is whole cells
                    assert all((u - v) % c == 0 for u, v in zip(a, b, strict=True)), (family, a, b)
            key = it.scene["query"]["key"]
            if family in ("flash_count", "when", "moved", "direction", "change"):
                runs = np.split(np.array(key), np.flatnonzero(np.diff(key) > 1) + 1)
                assert all(r[0] % TEMPORAL == 0 and len(r) % TEMPORAL == 0 for r in runs), (family, key)
            else:
                assert all(t % TEMPORAL == 0 and t > 0 for t in key), (family, key)


def test_video_frames_reach_testbed_qwen2vl_unresampled_one_cell_one_token() -> None:
    pytest.importorskip("transformers")
    from mmtok.adapters.qwen2_vl import video_patches
    from mmtok.testbed.models import CLIP_MEAN, CLIP_STD, SPECS

    size = SPECS["testbed-qwen2vl"].sizes["full"]
    assert (VIDEO_SIZE, VIDEO_CELL, TEMPORAL) == (size.video_size, size.patch_size * size.merge_size,
                                                  size.temporal_patch_size)
    # The video processor settings build_qwen2vl gives the full spec.
    cfg = {"patch_size": size.patch_size, "temporal_patch_size": size.temporal_patch_size,
           "merge_size": size.merge_size, "rescale_factor": 1 / 255, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD), "size": {"shortest_edge": size.video_size**2,
                                                 "longest_edge": size.video_size**2}}
    it = D.item("video", "train", 0)
    raw = np.stack([np.asarray(f) for f in it.media])
    patches, grid = video_patches(raw, cfg)
    assert grid == [8, 24, 24] and patches.shape[0] // size.merge_size**2 == size.video_tokens(16) == 1152
    # Undo the patch layout: the pixels are the frames' own, normalised, not resampled.
    p, tp, m = size.patch_size, size.temporal_patch_size, size.merge_size
    t, gh, gw = grid
    back = patches.reshape(t, gh // m, gw // m, m, m, 3, tp, p, p).transpose(0, 6, 1, 3, 7, 2, 4, 8, 5)
    back = back.reshape(t * tp, gh * p, gw * p, 3)
    want = (raw / np.float32(255) - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(back, want, atol=1e-5)
    # So the pixels of merged token (patch q, row i, column j) are exactly cell (i, j) of frames 2q, 2q + 1.
    tokens = patches.reshape(t, gh // m, gw // m, m * m * 3 * tp * p * p)
    obj = it.scene["frames"][0][0]
    i, j = obj["box"][1] // VIDEO_CELL, obj["box"][0] // VIDEO_CELL
    cell = want[0:2, i * VIDEO_CELL:(i + 1) * VIDEO_CELL, j * VIDEO_CELL:(j + 1) * VIDEO_CELL]
    np.testing.assert_allclose(np.sort(tokens[0, i, j]), np.sort(cell.ravel()), atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="modality"):
        D.item("text", "train", 0)
    with pytest.raises(ValueError, match="split"):
        D.item("image", "val", 0)
    with pytest.raises(ValueError, match="form"):
        D.item("image", "train", 0, form="open")
    with pytest.raises(ValueError, match="index"):
        D.item("image", "train", -1)
    with pytest.raises(ValueError, match="seed"):
        D.item("image", "train", 0, -5)
    with pytest.raises(ValueError, match="video family"):
        D.item("image", "train", 0, family="when")
    with pytest.raises(ValueError, match="family"):
        D.item("image", "train", 0, family="nope")
    with pytest.raises(TypeError, match="index"):
        D.item("image", "train", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="index"):
        D.item("image", "train", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        D.dataset("image", "train", -1)
    with pytest.raises(ValueError, match="families"):
        D.dataset("image", "train", 3, families=[])
    with pytest.raises(ValueError, match="family"):
        D.dataset("image", "train", 3, families=["chirp"])
    with pytest.raises(ValueError, match="modality"):
        D.families("smell")
    with pytest.raises(ValueError, match="family"):
        D.chance("nope")
    with pytest.raises(ValueError, match="form"):
        D.chance("count", "mixed")
    with pytest.raises(TypeError):
        C.check("not an item")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- the checker itself


def test_components_known_answer() -> None:
    idx = np.full((6, 8), -1, dtype=np.int16)
    idx[0, 0] = idx[1, 1] = idx[2, 2] = 3  # diagonal chain: one 8-connected component
    idx[0, 5:8] = 3  # same value, apart: a second component
    idx[4:6, 0:3] = 1  # another value
    idx[4:6, 3:5] = 2  # touches value 1 but differs: its own component
    comps = sorted((c["value"], c["box"], c["area"]) for c in C.components(idx))
    assert comps == [(1, (0, 4, 3, 6), 6), (2, (3, 4, 5, 6), 4), (3, (0, 0, 3, 3), 3), (3, (5, 0, 8, 1), 3)]
    assert C.components(np.full((3, 3), -1, dtype=np.int16)) == []


def test_shape_classifier_on_every_size() -> None:
    for size in range(12, 45):
        for shape in SHAPES:
            img = Image.new("RGB", (60, 60), (128, 128, 128))
            draw_shape(ImageDraw.Draw(img), shape, [5, 7, 5 + size, 7 + size], (220, 30, 30))
            ((colour, found, box),), _ = C.objects_in(np.asarray(img))
            assert (colour, found, box) == ("red", shape, (5, 7, 5 + size, 7 + size)), size


def test_label_reader_known_text() -> None:
    for text, size in (("27AX", 15), ("HE9", 18), ("YKLP", 16)):
        scene = {"size": 120, "background": 1, "objects": [],
                 "label": {"box": [10, 20, 90, 48], "text": text, "font_size": size}}
        rgb = np.asarray(render_image(scene))
        assert C.read_label(rgb, (10, 20, 90, 48), size) == text


def test_audio_events_known_answer() -> None:
    events = [{"kind": "tone", "start_ms": 300, "dur_ms": 200, "f0": 500, "f1": 500, "amplitude": 0.3},
              {"kind": "chirp", "start_ms": 900, "dur_ms": 400, "f0": 600, "f1": 1200, "amplitude": 0.2},
              {"kind": "tone", "start_ms": 1700, "dur_ms": 100, "f0": 1500, "f1": 1500, "amplitude": 0.1}]
    scene = {"sample_rate": SAMPLE_RATE, "duration_ms": 3000, "noise": {"seed": 0, "level": 0.03},
             "hum": {"freq": 150, "amplitude": 0.08, "phase": 0.0}, "events": events}
    found = C.audio_events(render_audio(scene), SAMPLE_RATE)
    assert len(found) == 3
    for ev, got in zip(events, found, strict=True):
        assert got["start"] == pytest.approx(ev["start_ms"] / 1000, abs=0.03)
        assert got["dur"] == pytest.approx(ev["dur_ms"] / 1000, abs=0.04)
    assert found[0]["f_start"] == pytest.approx(500, rel=0.03) and found[0]["f_end"] == pytest.approx(500, rel=0.03)
    assert found[1]["f_end"] / found[1]["f_start"] > 1.3
    assert found[0]["level"] > found[2]["level"] * 2


def test_checker_catches_a_wrong_answer() -> None:
    for modality, family in ALL:
        it = items(modality, family, "train", 25)[0]
        wrong = next(c for c in it.choices if c != it.answer)
        res = C.check(dataclasses.replace(it, answer=wrong), media=False)
        assert not res.ok and any("scene gives" in p for p in res.problems)


def test_checker_catches_media_that_disagree() -> None:
    # Paint over the object inside the box: the pixels no longer show the scene's answer.
    it = items("image", "inside", "train", 25)[0]
    x0, y0, x1, y1 = it.scene["query"]["key"][0]
    img = it.media.copy()
    ImageDraw.Draw(img).rectangle([x0 + 3, y0 + 3, x1 - 4, y1 - 4], fill=(128, 128, 128))
    res = C.check(dataclasses.replace(it, media=img))
    assert not res.ok and res.media_answer != it.answer
    # Drop the frames of a flash: the video then shows fewer flashes than the scene says.
    it = next(v for v in items("video", "flash_count", "train", 25) if v.answer != "1")
    frames, key = list(it.media), it.scene["query"]["key"]
    first = [t for i, t in enumerate(key) if t == key[0] + i]  # the frames of the first flash
    for t in first:
        frames[t] = frames[first[-1] + 1]  # the object is dark right after a flash
    res = C.check(dataclasses.replace(it, media=frames))
    assert not res.ok and res.media_answer != it.answer
    # Silence the second tone.
    it = items("audio", "higher", "train", 25)[0]
    start, end = it.scene["query"]["key"][1]
    wave = it.media.copy()
    wave[start * 16:end * 16] = 0
    res = C.check(dataclasses.replace(it, media=wave))
    assert not res.ok


def test_checker_catches_a_scene_in_the_wrong_split() -> None:
    it = items("audio", "chirp", "train", 25)[0]
    res = C.check(dataclasses.replace(it, split="test"), media=False)
    assert any("hashes into" in p for p in res.problems)


def test_generator_imports_no_transformers() -> None:
    import ast
    from pathlib import Path

    folder = Path(D.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in {"__future__", "collections", "dataclasses", "functools", "hashlib",
                                              "json", "re", "typing", "zlib", "numpy", "PIL", "mmtok"}, (path, name)
                assert not name.startswith("mmtok.") or name.startswith("mmtok.testbed.data"), (path, name)


@pytest.mark.slow
@pytest.mark.parametrize(("modality", "family"), ALL)
def test_checker_agrees_on_many_items(modality: str, family: str) -> None:
    for split in D.SPLITS:
        for it in D.dataset(modality, split, n=200, seed=7, families=[family]):
            res = C.check(it)
            assert res.ok, (split, it.index, it.question, it.answer, res.problems)
