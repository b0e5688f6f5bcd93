"""Relation items split by whether the clutter holds a colour-shape swap of the two named objects.

"Which is further left, the orange square or the purple diamond?" with an orange diamond or a purple square
in the scene asks the model to bind each colour to its shape: an attention read whose query and keys add
colour and shape features scores the swaps like the named pair (docs/testbed.md, recipe item 15). The split
shows how much of a model's relation accuracy is lost on those items.

Example::

    with_swap, without = relation_swap_split(*mmtok.load("testbed-llava", dtype="float32"), n=200)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmtok.testbed.data import HELDOUT_SPLIT, QAItem, item
from mmtok.testbed.evaluate import FamilyScore, evaluate


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
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = [item("image", HELDOUT_SPLIT, i, seed, family="relation", form=form) for i in range(n)]
    swapped = [bool(swaps(named_pair(it), it.scene["objects"])) for it in items]
    sides = ([it for it, s in zip(items, swapped, strict=True) if s],
             [it for it, s in zip(items, swapped, strict=True) if not s])
    out = []
    for side in sides:
        if side:
            out.append(evaluate(model, processor, side, batch_size=batch_size).scores[0])
        else:
            out.append(FamilyScore("relation", "image", 0, 0, 0.5))
    return out[0], out[1]
