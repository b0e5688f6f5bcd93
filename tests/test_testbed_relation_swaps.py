"""Relation items split by colour-shape swaps of the named pair (recipe item 15 of docs/testbed.md)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import HELDOUT_SPLIT, item  # noqa: E402
from mmtok.testbed.relation_swaps import named_pair, relation_axis_split, relation_swap_split, swaps  # noqa: E402


def _obj(colour, shape):
    return {"colour": colour, "shape": shape, "box": [0, 0, 1, 1]}


def test_swaps_are_the_cross_pairs_only():
    objects = [_obj("orange", "square"), _obj("purple", "diamond"), _obj("orange", "diamond"),
               _obj("purple", "circle"), _obj("red", "square"), _obj("purple", "square")]
    found = swaps(("orange square", "purple diamond"), objects)
    assert [(o["colour"], o["shape"]) for o in found] == [("orange", "diamond"), ("purple", "square")]
    # a pair sharing its shape (or colour) has no swap but itself
    assert swaps(("blue cross", "red cross"), [_obj("blue", "cross"), _obj("red", "cross")]) == []
    with pytest.raises(ValueError, match="two 'colour shape' names"):
        swaps(("orange",), objects)


@pytest.mark.parametrize("form", ["short", "mc"])
def test_the_named_pair_is_read_from_both_question_forms(form):
    it = item("image", HELDOUT_SPLIT, 1, 0, family="relation", form=form)
    pair = named_pair(it)
    assert it.answer in pair
    names = {f"{o['colour']} {o['shape']}" for o in it.scene["objects"]}
    assert set(pair) <= names


def test_the_split_covers_every_item_once_and_matches_the_whole_score():
    import mmtok
    from mmtok.testbed.evaluate import evaluate

    model, processor = mmtok.load("testbed-llava", dtype="float32")
    with_swap, without = relation_swap_split(model, processor, n=12)
    items = [item("image", HELDOUT_SPLIT, i, 0, family="relation", form="short") for i in range(12)]
    expected = sum(bool(swaps(named_pair(it), it.scene["objects"])) for it in items)
    assert (with_swap.total, without.total) == (expected, 12 - expected)
    whole = evaluate(model, processor, items).scores[0]
    assert with_swap.correct + without.correct == whole.correct
    with pytest.raises(ValueError, match="n must be"):
        relation_swap_split(model, processor, n=0)


def test_the_axis_split_puts_left_right_questions_apart_and_matches_the_whole_score():
    import mmtok
    from mmtok.testbed.evaluate import evaluate

    model, processor = mmtok.load("testbed-llava", dtype="float32")
    horizontal, vertical = relation_axis_split(model, processor, n=12)
    items = [item("image", HELDOUT_SPLIT, i, 0, family="relation", form="short") for i in range(12)]
    # read from the question's words, not the scene's query
    across = sum(" further left " in it.prompt or " further right " in it.prompt for it in items)
    assert 0 < across < 12 and (horizontal.total, vertical.total) == (across, 12 - across)
    whole = evaluate(model, processor, items).scores[0]
    assert horizontal.correct + vertical.correct == whole.correct
    with pytest.raises(ValueError, match="n must be"):
        relation_axis_split(model, processor, n=0)
