"""Relation items split by whether the clutter holds a colour-shape swap of the named pair, or by axis.

"Which is further left, the orange square or the purple diamond?" with an orange diamond or a purple square
in the scene asks the model to bind each colour to its shape: an attention read whose query and keys add
colour and shape features scores the swaps like the named pair (docs/testbed.md, recipe item 15). The split
shows how much of a model's relation accuracy is lost on those items.

The axis split separates "further left / right" from "higher / lower": a Llava language model gets the rows
of its image tokens from its 1-D positions (they run row by row), but must compare columns from the tokens'
contents, and a model can learn the one and not the other (docs/testbed.md, Status: run B's lineage answers
the vertical questions and guesses the horizontal ones).

Example::

    with_swap, without = relation_swap_split(*mmtok.load("testbed-llava", dtype="float32"), n=200)
    horizontal, vertical = relation_axis_split(*mmtok.load("testbed-llava", dtype="float32"), n=200)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtok.testbed.data import HELDOUT_SPLIT, QAItem, item
from mmtok.testbed.evaluate import FamilyScore, evaluate

HORIZONTAL = ("left", "right")
"""The relations along the image's columns (the others, "higher" and "lower", run along its rows)."""


def swaps(named: Sequence[str], objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects that pair one named object's colour with the other's shape.

    Args:
        named: the two named objects, ``"colour shape"`` each (e.g. ``("orange square", "purple diamond")``).
        objects: the scene's objects (``{"colour", "shape", ...}`` dicts).

    Raises:
        ValueError: ``named`` is not two ``"colour shape"`` names.
    """
    if len(named) != 2 or any(len(n.split()) != 2 for n in named):
        raise ValueError(f"named must be two 'colour shape' names, got {list(named)}")
    (ca, sa), (cb, sb) = (n.split() for n in named)
    swapped = {(ca, sb), (cb, sa)} - {(ca, sa), (cb, sb)}
    return [o for o in objects if (o["colour"], o["shape"]) in swapped]


def named_pair(it: QAItem) -> tuple[str, str]:
    """The two objects a relation item's question names (``"... , the A or the B ?"``)."""
    question = it.prompt.split(" ? ")[0].rstrip(" ?")
    a, b = question.split(", the ", 1)[1].split(" or the ")
    return a, b


def relation_swap_split(model: Any, processor: Any, n: int = 200, seed: int = 0, form: str = "short",
                        batch_size: int = 16) -> tuple[FamilyScore, FamilyScore]:
    """Held-out relation accuracy on the first ``n`` items, with and without a swap in the clutter.

    Returns:
        ``(with a swap, without)``, each a :class:`~mmtok.testbed.evaluate.FamilyScore` (``total`` 0 when no
        item falls on that side).

    Raises:
        ValueError: ``n`` < 1.
    """
    items = _relation_items(n, seed, form)
    return _sides(model, processor, items, [bool(swaps(named_pair(it), it.scene["objects"])) for it in items],
                  batch_size)


def relation_axis_split(model: Any, processor: Any, n: int = 200, seed: int = 0, form: str = "short",
                        batch_size: int = 16) -> tuple[FamilyScore, FamilyScore]:
    """Held-out relation accuracy on the first ``n`` items, left / right questions apart from higher / lower.

    Returns:
        ``(horizontal, vertical)``, each a :class:`~mmtok.testbed.evaluate.FamilyScore` (``total`` 0 when no
        item falls on that side).

    Raises:
        ValueError: ``n`` < 1.
    """
    items = _relation_items(n, seed, form)
    return _sides(model, processor, items, [it.scene["query"]["relation"] in HORIZONTAL for it in items],
                  batch_size)


def _relation_items(n: int, seed: int, form: str) -> list[QAItem]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [item("image", HELDOUT_SPLIT, i, seed, family="relation", form=form) for i in range(n)]


def _sides(model: Any, processor: Any, items: Sequence[QAItem], first: Sequence[bool], batch_size: int
           ) -> tuple[FamilyScore, FamilyScore]:
    """The scores of the items marked True in ``first`` and of the rest."""
    out = []
    for side in (True, False):
        chosen = [it for it, mark in zip(items, first, strict=True) if mark == side]
        out.append(evaluate(model, processor, chosen, batch_size=batch_size).scores[0] if chosen
                   else FamilyScore("relation", "image", 0, 0, 0.5))
    return out[0], out[1]
