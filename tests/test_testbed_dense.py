"""The grid layout of testbed images and the dense per-token probe used while training testbed-llava."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset, families  # noqa: E402
from mmtok.testbed.data.images import CELL, IMAGE_SIZE  # noqa: E402
from mmtok.testbed.dense import (  # noqa: E402
    CHAR_CLASSES,
    COLOUR_CLASSES,
    HORIZONTAL_CLASSES,
    IGNORE,
    IMAGE_HEADS,
    IMAGE_RAMPS,
    SHAPE_CLASSES,
    TEMPERATURE,
    VERTICAL_CLASSES,
    DenseProbe,
    answer_order,
    attention_loss,
    batch_labels,
    cell_labels,
    class_word_ids,
    half_labels,
    key_cells,
    lookalike_cells,
    position_ramp,
    ramp_loss,
    relevance_loss,
    relevance_terms,
    swap_cells,
)
from mmtok.testbed.models import Size, get_spec  # noqa: E402
from mmtok.testbed.train import train  # noqa: E402

G = IMAGE_SIZE // CELL


def _block(box: list[int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return x0 // CELL, y0 // CELL, (x1 - 1) // CELL, (y1 - 1) // CELL


def test_objects_sit_in_whole_cells_a_cell_apart() -> None:
    for fam in families("image"):
        for it in dataset("image", "train", 12, families=[fam]):
            blocks = [_block(o["box"]) for o in it.scene["objects"]]
            for (cx0, cy0, cx1, cy1), o in zip(blocks, it.scene["objects"], strict=True):
                w = o["box"][2] - o["box"][0]
                cells = 1 if w <= CELL - 4 else 2
                assert (cx1 - cx0 + 1, cy1 - cy0 + 1) == (cells, cells), (fam, o)
                # Centred: the box keeps >= 2 px from the block's edges, so neighbours keep the 4 px gap.
                assert o["box"][0] - cx0 * CELL >= 2 and (cx1 + 1) * CELL - o["box"][2] >= 2
            if fam != "inside":  # the object in the box shares the box outline's block on purpose
                cells = [(x, y) for x0, y0, x1, y1 in blocks for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]
                assert len(cells) == len(set(cells)), fam


def test_cell_labels_known_answer() -> None:
    scene = {
        "size": 84,  # 4 x 4 cells of 21 px
        "objects": [
            {"colour": "red", "shape": "circle", "box": [2, 2, 19, 19]},  # cell (0, 0)
            {"colour": "blue", "shape": "cross", "box": [44, 2, 82, 40]},  # cells x 2-3, y 0-1
            {"colour": "green", "shape": "square", "box": [26, 68, 37, 79]},  # cell (1, 3)
        ],
        "label": {"box": [2, 44, 40, 61], "text": "7A", "font_size": 15, "pitch": 21},  # cells (0, 2), (1, 2)
    }
    lab = cell_labels(scene, 21).reshape(4, 4, 3)
    colour = [[COLOUR_CLASSES[i] for i in row] for row in lab[..., 0].tolist()]
    shape = [[SHAPE_CLASSES[i] for i in row] for row in lab[..., 1].tolist()]
    chars = [[CHAR_CLASSES[i] for i in row] for row in lab[..., 2].tolist()]
    assert colour == [["red", "none", "blue", "blue"], ["none", "none", "blue", "blue"],
                      ["none", "none", "none", "none"], ["none", "green", "none", "none"]]
    assert shape == [["circle", "none", "cross", "cross"], ["none", "none", "cross", "cross"],
                     ["label", "label", "none", "none"], ["none", "square", "none", "none"]]
    assert chars[2][:2] == ["7", "A"] and sum(c != "none" for row in chars for c in row) == 2
    framed = {"size": 84, "objects": [{"colour": "red", "shape": "circle", "box": [25, 25, 38, 38]}],
              "frame": {"box": [2, 2, 61, 61], "width": 2}}
    shape = cell_labels(framed, 21).reshape(4, 4, 3)[..., 1]
    assert SHAPE_CLASSES[int(shape[1, 1])] == "circle"
    assert [SHAPE_CLASSES[int(v)] for v in shape[:3, :3].flatten()].count("box") == 8
    with pytest.raises(ValueError, match="multiple"):
        cell_labels(scene, 25)


def test_labels_of_generated_items_match_their_objects() -> None:
    items = list(dataset("image", "train", 16, form="mixed"))
    labels = batch_labels(items, CELL)
    assert labels.shape == (16, G * G, 7)
    for it, lab in zip(items, labels, strict=True):
        covered = 0
        for o in it.scene["objects"]:
            x0, y0, x1, y1 = _block(o["box"])
            covered += (x1 - x0 + 1) * (y1 - y0 + 1)
        if it.family != "inside":
            assert int((lab[:, 0] > 0).sum()) == covered
        if "label" in it.scene:
            text = it.scene["label"]["text"]
            assert "".join(CHAR_CLASSES[i] for i in lab[:, 2].tolist() if i) == text
            # answer word i reads the cell with bit i - 1: the label's characters in reading order
            marked = sorted((int(w), CHAR_CLASSES[int(c)]) for w, c in zip(lab[:, 6], lab[:, 2], strict=True) if w)
            assert [w for w, _ in marked] == [1 << i for i in range(len(text))]
            assert "".join(c for _, c in marked) == text
        elif it.family != "relation":
            assert int(lab[:, 6].abs().sum()) == 0
        assert (lab[:, 3:5] == half_labels(G)).all()


def test_half_labels_known_answer() -> None:
    halves = half_labels(4).reshape(4, 4, 2)
    vertical = [[VERTICAL_CLASSES[i] for i in row] for row in halves[..., 0].tolist()]
    horizontal = [[HORIZONTAL_CLASSES[i] for i in row] for row in halves[..., 1].tolist()]
    assert vertical == [["top"] * 4] * 2 + [["bottom"] * 4] * 2
    assert horizontal == [["left", "left", "right", "right"]] * 4
    assert IMAGE_HEADS[-2:] == (VERTICAL_CLASSES, HORIZONTAL_CLASSES)
    with pytest.raises(ValueError, match="even"):
        half_labels(5)


@pytest.mark.parametrize(("relation", "answer"), [("left", "a"), ("right", "b"), ("higher", "b"), ("lower", "a")])
def test_relation_answer_order_marks_the_object_that_answers(relation: str, answer: str) -> None:
    a, b = [2, 44, 19, 61], [65, 2, 82, 19]  # a: cell (x 0, y 2), left and lower; b: cell (x 3, y 0)
    scene = {"size": 84, "objects": [], "query": {"relation": relation, "key": [a, b]}}
    order = answer_order(scene, 21).reshape(4, 4)
    want = torch.zeros(4, 4, dtype=torch.long)
    want[(2, 0) if answer == "a" else (0, 3)] = 1
    assert (order == want).all()
    # both answer words ("colour shape") read the same object: bits 0 and 1
    assert (answer_order(scene, 21, relation_every_word=True).reshape(4, 4) == 3 * want).all()


def test_relation_every_word_marks_only_relation_answers() -> None:
    items = list(dataset("image", "train", 16, form="mixed"))
    plain, every = batch_labels(items, CELL), batch_labels(items, CELL, relation_every_word=True)
    assert torch.equal(plain[..., :6], every[..., :6])
    for it, p, e in zip(items, plain[..., 6], every[..., 6], strict=True):
        if it.family == "relation":
            assert int((p == 1).sum()) > 0 and torch.equal(e, 3 * p)
        else:
            assert torch.equal(p, e)


def test_relation_items_mark_the_object_their_answer_names() -> None:
    items = list(dataset("image", "train", 24, families=["relation"], form="short"))
    for it, lab in zip(items, batch_labels(items, CELL), strict=True):
        marked = (lab[:, 6] == 1).nonzero()[:, 0]
        named = {(COLOUR_CLASSES[int(lab[c, 0])], SHAPE_CLASSES[int(lab[c, 1])]) for c in marked}
        assert len(marked) >= 1 and named == {tuple(it.answer.split())}, it.answer


def test_probe_loss_is_the_three_cross_entropies() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(60, 8)
    bounds = torch.tensor([0, len(COLOUR_CLASSES), len(SHAPE_CLASSES), len(CHAR_CLASSES)]).cumsum(0).tolist()
    ids = [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    probe = DenseProbe(emb, ids)
    assert tuple(len(i) for i in ids) == probe.sizes
    tokens = torch.randn(2, 5, 8)
    labels = torch.stack([torch.randint(0, n, (2, 5)) for n in probe.sizes], -1)
    logits = TEMPERATURE * torch.nn.functional.cosine_similarity(tokens[:, :, None], emb.weight[:bounds[-1]][None, None],
                                                                 dim=-1)
    a, b = probe.sizes[0], probe.sizes[0] + probe.sizes[1]
    want = sum(torch.nn.functional.cross_entropy(lg.reshape(10, -1), labels[..., k].reshape(10))
               for k, lg in enumerate((logits[..., :a], logits[..., a:b], logits[..., b:])))
    assert torch.allclose(probe(tokens, labels), want, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        probe(tokens, labels[:, :4])


GRID_SIZE = Size(image_size=IMAGE_SIZE, patch_size=CELL, vision_hidden=16, vision_layers=1, vision_heads=2,
                 text_hidden=16, text_layers=1, text_heads=2, text_kv_heads=1, mlp_ratio=2)


def _run(tmp, **kw):
    args = dict(size=GRID_SIZE, steps=3, batch_size=4, lr=5e-3, warmup=0, seed=0, work_dir=tmp, eval_every=0,
                dense_weight=0.5, attention_weight=0.0, log=lambda s: None)
    args.update(kw)
    return train("testbed-llava", **args)


def test_dense_training_lowers_the_probe_loss_resumes_exactly_and_ships_no_probe(tmp_path) -> None:
    torch.set_num_threads(1)
    full = _run(tmp_path / "full", steps=4)
    assert len(full["dense_losses"]) == 4 and full["dense_losses"][-1] < full["dense_losses"][0]
    part = _run(tmp_path / "part", steps=4, until=2)
    rest = _run(tmp_path / "part", steps=4, resume=True)
    assert rest["losses"] == full["losses"] and rest["dense_losses"] == full["dense_losses"]
    model, _ = get_spec("testbed-llava").build(GRID_SIZE, 0)
    assert set(full["model"].state_dict()) == set(model.state_dict())  # the probe is not part of the model
    assert len(part["losses"]) == 2
    with pytest.raises(ValueError, match="dense"):
        _run(tmp_path / "tiny", size="tiny", steps=1)  # 56 px / 14 px: the grid is not the scene's


def test_tied_read_out_scores_tokens_against_the_class_words() -> None:
    model, processor = get_spec("testbed-llava").build("tiny", seed=0)
    ids = class_word_ids(processor.tokenizer)
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(ids[0]) == [tok.pad_token, *COLOUR_CLASSES[1:]]
    assert tok.convert_ids_to_tokens(ids[1])[-2:] == ["box", "label"]
    assert tok.convert_ids_to_tokens(ids[2])[1:] == list(CHAR_CLASSES[1:])
    emb = model.get_input_embeddings()
    probe = DenseProbe(emb, ids)
    assert not list(probe.parameters())  # nothing to ship or drop: the read-out is the model's embedding
    tokens = torch.randn(1, 3, emb.embedding_dim)
    flat = [i for row in ids for i in row]
    cos = torch.nn.functional.cosine_similarity(tokens[:, :, None], emb.weight[flat][None, None], dim=-1)
    assert torch.allclose(probe.logits(tokens), TEMPERATURE * cos, atol=1e-5)
    assert torch.allclose(probe.logits(7 * tokens), probe.logits(tokens), atol=1e-5)  # no gain from norms
    # With orthogonal word vectors, the token "red" + "circle" scores those words highest in its heads.
    wide = torch.nn.Embedding(emb.num_embeddings, 2 * emb.num_embeddings)
    with torch.no_grad():
        wide.weight.copy_(torch.eye(emb.num_embeddings, 2 * emb.num_embeddings) * 5)
    one = wide.weight[tok.convert_tokens_to_ids("red")] + wide.weight[tok.convert_tokens_to_ids("circle")]
    colour, shape, _ = DenseProbe(wide, ids).logits(one).split(probe.sizes)
    assert COLOUR_CLASSES[int(colour.argmax())] == "red" and SHAPE_CLASSES[int(shape.argmax())] == "circle"
    with pytest.raises(ValueError, match="word_ids"):
        DenseProbe(emb, [ids[0], ids[1]])


def test_balanced_read_out_weighs_each_class_alike() -> None:
    # Word vectors e0, e1, e2 (orthonormal): a token equal to e0 scores class 0 at TEMPERATURE, the others at 0.
    words = torch.nn.Embedding(3, 3)
    with torch.no_grad():
        words.weight.copy_(torch.eye(3))
    tokens = torch.eye(3)[[0, 0, 0, 1]][None]  # three tokens read as class 0, one as class 1
    labels = torch.tensor([[0, 0, 0, 2]])[..., None]  # the last is class 2, read wrong
    right = torch.log(2 + torch.exp(torch.tensor(TEMPERATURE))) - TEMPERATURE  # CE of a token read right
    wrong = torch.log(2 + torch.exp(torch.tensor(TEMPERATURE)))  # CE of the class-2 token (scores T, 0, 0)
    plain = DenseProbe(words, [[0, 1, 2]], [("a", "b", "c")])
    balanced = DenseProbe(words, [[0, 1, 2]], [("a", "b", "c")], balanced=True)
    assert torch.allclose(plain(tokens, labels), (3 * right + wrong) / 4)
    assert torch.allclose(balanced(tokens, labels), (right + wrong) / 2)  # the mean of class 0's and class 2's
    ignored = torch.tensor([[0, IGNORE, IGNORE, 2]])[..., None]
    assert torch.allclose(balanced(tokens, ignored), (right + wrong) / 2)


def test_training_with_the_position_ramp_records_it_and_needs_the_probe(tmp_path) -> None:
    import json

    torch.set_num_threads(1)
    hard = _run(tmp_path / "hard", steps=1)
    ramp = _run(tmp_path / "ramp", steps=1, position_ramp=True)
    assert ramp["settings"]["position_ramp"] is True and "position_ramp" not in hard["settings"]
    probe = [json.loads((tmp_path / d / "log.jsonl").read_text())["dense_terms"]["probe"] for d in ("hard", "ramp")]
    assert probe[0] != probe[1]  # same weights and batch: only the half heads' targets differ
    with pytest.raises(ValueError, match="position ramp"):
        _run(tmp_path / "none", steps=1, dense_weight=0.0, position_ramp=True)
    with pytest.raises(ValueError, match="train on images"):  # Qwen2-VL on its videos alone has no half heads
        train("testbed-qwen2vl", size=GRID_SIZE, steps=1, batch_size=2, lr=1e-4, warmup=0, dense_weight=1.0,
              modalities=["video"], position_ramp=True, work_dir=tmp_path / "video", log=lambda s: None)
    with pytest.raises(ValueError, match="made with"):  # a resume must keep the targets it started with
        _run(tmp_path / "hard", steps=1, resume=True, position_ramp=True)


def test_position_ramp_known_answer_agrees_with_the_halves() -> None:
    assert position_ramp(4, 1).reshape(4, 4)[2].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert position_ramp(4, 0).reshape(4, 4)[:, 1].tolist() == [0.125, 0.375, 0.625, 0.875]
    halves = half_labels(16)
    for k, axis in IMAGE_RAMPS.items():  # the half is the ramp's argmax: the position questions keep their words
        assert IMAGE_HEADS[k] == (VERTICAL_CLASSES, HORIZONTAL_CLASSES)[axis]
        assert ((position_ramp(16, axis) > 0.5).long() == halves[:, axis]).all()
    for g, axis in ((4, 2), (0, 0)):
        with pytest.raises(ValueError, match="axis 0"):
            position_ramp(g, axis)


def test_ramp_loss_is_the_kl_from_each_cells_place() -> None:
    q = position_ramp(2, 1)  # columns: 0.25, 0.75, 0.25, 0.75
    optimum = torch.stack([torch.zeros(4), torch.log(q / (1 - q))], -1)[None]
    keep = torch.ones(1, 4, dtype=torch.bool)
    assert ramp_loss(optimum, keep, 1).item() == pytest.approx(0.0, abs=1e-6)
    # Scores (0, 0) on the right column: KL of (0.25, 0.75) from (0.5, 0.5) = 0.25 ln 0.5 + 0.75 ln 1.5.
    flat = optimum.clone()
    flat[0, 1] = 0.0
    by_hand = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert ramp_loss(flat, keep, 1).item() == pytest.approx(by_hand.item() / 4, rel=1e-5)
    keep[0, 0] = False  # only kept tokens count
    assert ramp_loss(flat, keep, 1).item() == pytest.approx(by_hand.item() / 3, rel=1e-5)
    # The rows' ramp differs: the same scores are off on every token.
    assert ramp_loss(optimum, torch.ones(1, 4, dtype=torch.bool), 0).item() > 0.1
    with pytest.raises(ValueError, match="square grid"):
        ramp_loss(torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), 1)


def test_probe_with_ramps_trains_those_heads_on_the_ramp_and_the_rest_as_before() -> None:
    words = torch.nn.Embedding(5, 5)
    with torch.no_grad():
        words.weight.copy_(torch.eye(5))
    heads = [("a", "b", "c"), ("left", "right")]
    tokens = torch.randn(2, 16, 5)
    labels = torch.stack([torch.randint(0, 3, (2, 16)), half_labels(4)[None, :, 1].expand(2, 16)], -1)
    labels[1, 5, 1] = IGNORE
    plain = DenseProbe(words, [[0, 1, 2], [3, 4]], heads)
    ramped = DenseProbe(words, [[0, 1, 2], [3, 4]], heads, ramps={1: 1})
    first, second = plain.logits(tokens).split(plain.sizes, -1)
    first_ce = torch.nn.functional.cross_entropy(first.reshape(-1, 3), labels[..., 0].reshape(-1))
    assert torch.allclose(ramped(tokens, labels), first_ce + ramp_loss(second, labels[..., 1] != IGNORE, 1))
    assert not torch.allclose(ramped(tokens, labels), plain(tokens, labels))
    with pytest.raises(ValueError, match="two-class head"):
        DenseProbe(words, [[0, 1, 2], [3, 4]], heads, ramps={0: 1})


def test_key_cells_known_answer_and_every_family_has_its_keys() -> None:
    scene = {"size": 84, "objects": [], "query": {"key": [[2, 2, 19, 19], [44, 2, 82, 40]]}}
    assert key_cells(scene, 21).reshape(4, 4).tolist() == [[1, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    for fam in families("image"):
        for it in dataset("image", "train", 6, families=[fam]):
            n = int(key_cells(it.scene, CELL).sum())
            if fam == "exists" and it.answer == "no":
                assert n == 0
            else:
                assert n >= 1, fam


def _relation_scene(objects):
    """An 84 px scene (4 x 4 cells of 21 px) asking about its first two objects."""
    objs = [{"colour": c, "shape": sh, "box": box} for c, sh, box in objects]
    return {"size": 84, "objects": objs, "query": {"relation": "left", "key": [objs[0]["box"], objs[1]["box"]]}}


def test_swap_cells_mark_the_colour_shape_swaps_of_the_named_pair_only() -> None:
    scene = _relation_scene([("orange", "square", [0, 0, 21, 21]), ("purple", "diamond", [63, 0, 84, 21]),
                             ("orange", "diamond", [0, 63, 21, 84]), ("purple", "square", [42, 42, 84, 63]),
                             ("orange", "circle", [21, 21, 42, 42])])
    assert swap_cells(scene, 21).reshape(4, 4).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]
    assert int(swap_cells({**scene, "query": {"key": scene["query"]["key"]}}, 21).sum()) == 0  # not a relation
    # a swap under a key box stays a key cell
    overlapped = _relation_scene([("orange", "square", [0, 0, 42, 42]), ("purple", "diamond", [63, 0, 84, 21]),
                                  ("orange", "diamond", [21, 21, 42, 42])])
    assert int(swap_cells(overlapped, 21).sum()) == 0
    labels = batch_labels([item for item in dataset("image", "train", 80, families=["relation"])], CELL)
    flags = labels[..., -2]
    assert set(flags.unique().tolist()) == {0, 1, 2}  # some of 80 relation scenes hold a swap
    for it, row in zip(dataset("image", "train", 80, families=["relation"]), flags, strict=True):
        assert torch.equal(row == 1, key_cells(it.scene, CELL) == 1)
        assert torch.equal(row == 2, swap_cells(it.scene, CELL) == 1)


def test_relevance_swap_class_weighs_the_swaps_alone_and_is_off_by_default() -> None:
    yes, no = 3, 1
    cells = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, yes] = 2.0  # the key token says yes
    logits[0, 3, yes] = 2.0  # the swap token says yes too
    key = torch.tensor([[1, 0, 0, 2]])
    right, wrong, even = (torch.nn.functional.softplus(torch.tensor(-2.0)), torch.nn.functional.softplus(torch.tensor(2.0)),
                          torch.log(torch.tensor(2.0)))
    sums, counts = relevance_terms(logits, cells, key, yes, no)
    assert counts.tolist() == [3, 1, 0, 0]  # off: the swap is one more "no" token
    assert torch.allclose(sums, torch.stack([2 * even + wrong, right, torch.tensor(0.0), torch.tensor(0.0)]))
    assert torch.allclose(relevance_loss(logits, cells, key, yes, no), (right + (2 * even + wrong) / 3) / 2)
    # off, a swap flag counts exactly as a plain "no" token
    assert torch.equal(relevance_loss(logits, cells, key, yes, no),
                       relevance_loss(logits, cells, (key == 1).long(), yes, no))
    sums, counts = relevance_terms(logits, cells, key, yes, no, swap_class=True)
    assert counts.tolist() == [2, 1, 1, 0]
    assert torch.allclose(relevance_loss(logits, cells, key, yes, no, swap_class=True), (even + right + wrong) / 3)
    # a look-alike flag (3) works the same way with its own switch, and the two classes stay apart
    lookalike = torch.tensor([[1, 0, 0, 3]])
    assert torch.equal(relevance_loss(logits, cells, lookalike, yes, no), relevance_loss(logits, cells, key, yes, no))
    sums, counts = relevance_terms(logits, cells, lookalike, yes, no, swap_class=True, lookalike_class=True)
    assert counts.tolist() == [2, 1, 0, 1] and torch.allclose(sums[3], wrong)
    assert torch.allclose(relevance_loss(logits, cells, lookalike, yes, no, lookalike_class=True),
                          (even + right + wrong) / 3)
    assert relevance_terms(logits, cells, key, yes, no, lookalike_class=True)[1].tolist() == [3, 1, 0, 0]


def test_lookalike_cells_mark_the_named_objects_of_the_other_quadrants() -> None:
    objs = [{"colour": c, "shape": sh, "box": box} for c, sh, box in (
        ("red", "diamond", [0, 0, 21, 21]), ("blue", "diamond", [63, 0, 84, 21]),
        ("green", "diamond", [0, 63, 21, 84]), ("red", "circle", [42, 42, 63, 63]),
        ("cyan", "diamond", [63, 63, 84, 84]))]
    scene = {"size": 84, "objects": objs, "query": {"region": "top left", "ask": "colour", "key": [objs[0]["box"]]}}
    assert lookalike_cells(scene, 21).reshape(4, 4).tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0],
                                                                 [1, 0, 0, 1]]
    # asked for the shape of the red object: the other red object is the look-alike
    shape = {**scene, "query": {"region": "top left", "ask": "shape", "key": [objs[0]["box"]]}}
    assert lookalike_cells(shape, 21).reshape(4, 4).tolist() == [[0] * 4, [0] * 4, [0, 0, 1, 0], [0] * 4]
    items = list(dataset("image", "train", 40, form="mixed"))
    flags = batch_labels(items, CELL)[..., -2]
    for it, row in zip(items, flags, strict=True):
        assert torch.equal(row == 3, lookalike_cells(it.scene, CELL) == 1)
        if it.family == "position":  # one object with the named word per quadrant: three look-alikes
            named = "shape" if it.scene["query"]["ask"] == "colour" else "colour"
            key = next(o for o in it.scene["objects"] if list(o["box"]) == list(it.scene["query"]["key"][0]))
            assert sum(o[named] == key[named] for o in it.scene["objects"]) == 4 and int((row == 3).sum()) >= 3
        else:
            assert int((row == 3).sum()) == 0


def test_relevance_loss_known_answer() -> None:
    yes, no = 3, 1
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, yes] = 2.0  # visual token of cell 0 says yes
    logits[0, 2, no] = 2.0  # visual token of cell 1 says no
    cells = torch.tensor([[-1, 0, 1, -1]])  # positions 0 and 3 are text
    key = torch.tensor([[1, 0]])
    right = torch.nn.functional.softplus(torch.tensor(-2.0))  # -log sigmoid(2): both tokens right
    assert torch.allclose(relevance_loss(logits, cells, key, yes, no), right)
    wrong = torch.nn.functional.softplus(torch.tensor(2.0))
    assert torch.allclose(relevance_loss(logits, cells, torch.tensor([[0, 1]]), yes, no), wrong)
    # balanced: one key among three others weighs as much as all three together
    cells = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, yes] = 2.0
    got = relevance_loss(logits, cells, torch.tensor([[1, 0, 0, 0]]), yes, no)
    assert torch.allclose(got, (right + torch.log(torch.tensor(2.0))) / 2)


def test_attention_loss_known_answer() -> None:
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 2] = torch.tensor([0.1, 0.6, 0.2, 0.1, 0.0])  # position 2 predicts the first answer word
    attn[0, 1, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # another head: not supervised by default
    labels = torch.tensor([[-100, -100, -100, 7, 2]])
    cells = torch.tensor([[-1, 0, 1, -1, -1]])
    assert torch.allclose(attention_loss(attn, labels, cells, torch.tensor([[1, 0]])), -torch.log(torch.tensor(0.6)))
    assert torch.allclose(attention_loss(attn, labels, cells, torch.tensor([[1, 1]])), -torch.log(torch.tensor(0.8)))
    assert torch.allclose(attention_loss(attn, labels, cells, torch.tensor([[0, 1]]), head=1), torch.tensor(0.0))
    assert float(attention_loss(attn, labels, cells, torch.tensor([[0, 0]]))) == 0.0  # no key: left out
    # a swap cell is not read: the same loss as without its flag
    assert torch.allclose(attention_loss(attn, labels, cells, torch.tensor([[1, 2]])), -torch.log(torch.tensor(0.6)))


def test_attention_loss_reads_in_answer_order() -> None:
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, 2] = torch.tensor([0.1, 0.5, 0.2, 0.2, 0.0, 0.0])  # predicts answer word 1
    attn[0, 0, 3] = torch.tensor([0.1, 0.1, 0.4, 0.4, 0.0, 0.0])  # predicts answer word 2
    labels = torch.tensor([[-100, -100, -100, 7, 8, 2]])
    cells = torch.tensor([[-1, 0, 1, 2, -1, -1]])
    key = torch.tensor([[1, 1, 0]])
    order = torch.tensor([[1, 2, 0]])  # bits: cell 0 holds the first character, cell 1 the second
    want = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.4))) / 2
    assert torch.allclose(attention_loss(attn, labels, cells, key, order), want)
    swapped = -(torch.log(torch.tensor(0.2)) + torch.log(torch.tensor(0.1))) / 2
    assert torch.allclose(attention_loss(attn, labels, cells, key, torch.tensor([[2, 1, 0]])), swapped)
    # no order marks: the first answer word toward all key cells, as before
    assert torch.allclose(attention_loss(attn, labels, cells, key, torch.zeros(1, 3, dtype=torch.long)),
                          -torch.log(torch.tensor(0.7)))
    # a cell read by both words (a relation answer's object under relation_every_word): each word's mass on it
    both = -(torch.log(torch.tensor(0.2)) + torch.log(torch.tensor(0.4))) / 2  # cell 1 is token 2
    assert torch.allclose(attention_loss(attn, labels, cells, key, torch.tensor([[0, 3, 0]])), both)
    # the first word only (bit 0): the second word is not supervised
    assert torch.allclose(attention_loss(attn, labels, cells, key, torch.tensor([[0, 1, 0]])),
                          -torch.log(torch.tensor(0.2)))


def test_attention_supervision_needs_a_second_layer(tmp_path) -> None:
    with pytest.raises(ValueError, match="layer"):
        _run(tmp_path / "one", steps=1, attention_weight=1.0)
    two = Size(**{**GRID_SIZE.__dict__, "text_layers": 2})
    run = _run(tmp_path / "two", size=two, steps=2, attention_weight=1.0)
    assert len(run["losses"]) == 2
    assert run["model"].config.text_config._attn_implementation == "sdpa"  # back to SDPA after training
