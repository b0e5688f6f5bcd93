"""Dense per-token targets of the video items, for training ``testbed-qwen2vl`` (the image ones: ``dense``).

A generated video lays its objects out on the merged-token grid of ``testbed-qwen2vl`` and keeps every
state for whole temporal patches (:mod:`mmtok.testbed.data.videos`), so each of its 8 x 12 x 12 video tokens
covers one cell of one temporal patch, and the scene says exactly what is there. The same three hops as for
images (:mod:`mmtok.testbed.dense`) get a target: the tied read-out says the colour and shape of the object
in the token's cell, the relevance marks say whether the token is an *event* the question is about, and the
answer position attends to those event tokens. A video question's key (``scene["query"]["key"]``) lists the
frames where its answer lies (appearances, flashes, the steps of a move, a colour change); its event tokens,
in those frames' temporal patches, are the cells whose content differs from the previous patch (what
appeared, moved in, changed or vanished) and the objects that are gone or changed in the next patch (a
flash's object, a move's start), which is where a model sees the event happen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtok.testbed.data.items import QAItem
from mmtok.testbed.data.videos import CELL, TEMPORAL
from mmtok.testbed.dense import COLOUR_CLASSES, SHAPE_CLASSES


def video_cell_labels(scene: dict[str, Any]) -> torch.Tensor:
    """``[P * G * G, 3]`` long: colour, shape and character (always "none") classes per video token.

    Token ``p * G * G + r * G + c`` is temporal patch ``p`` (frames ``2p, 2p + 1``), row ``r``, column ``c``
    of the ``G = size / CELL`` grid (the order of Qwen2-VL's merged video tokens). An object labels the cell
    under its box centre, in the first frame of each patch (both frames of a patch are the same).

    Raises:
        ValueError: the frame size is not a multiple of the cell or the frame count not of the patch.
    """
    size, frames = scene["size"], scene["frames"]
    if size % CELL or len(frames) % TEMPORAL:
        raise ValueError(f"a video of {len(frames)} frames of {size} px is not on the {TEMPORAL}-frame x "
                         f"{CELL} px token grid")
    g, patches = size // CELL, len(frames) // TEMPORAL
    out = torch.zeros(patches, g, g, 3, dtype=torch.long)
    for p in range(patches):
        for obj in frames[p * TEMPORAL]:
            x0, y0, x1, y1 = obj["box"]
            r, c = ((y0 + y1) // 2) // CELL, ((x0 + x1) // 2) // CELL
            out[p, r, c, 0] = COLOUR_CLASSES.index(obj["colour"])
            out[p, r, c, 1] = SHAPE_CLASSES.index(obj["shape"])
    return out.reshape(patches * g * g, 3)


def video_key_cells(scene: dict[str, Any], labels: torch.Tensor | None = None) -> torch.Tensor:
    """``[P * G * G]`` long: 1 on the event tokens of the question's key frames, else 0.

    Args:
        scene: a video scene (``frames``, ``size``, ``query["key"]`` frame indices).
        labels: its :func:`video_cell_labels` when already computed.
    """
    labels = video_cell_labels(scene) if labels is None else labels
    g, patches = scene["size"] // CELL, len(scene["frames"]) // TEMPORAL
    content = labels[:, :2].reshape(patches, g * g, 2)
    differs = (content[1:] != content[:-1]).any(-1)  # [P - 1, G * G]: patch p + 1 differs from patch p
    arrived = torch.zeros(patches, g * g, dtype=torch.bool)  # what is new in patch p (shown or removed)
    arrived[1:] = differs
    leaving = torch.zeros(patches, g * g, dtype=torch.bool)  # an object shown in patch p, gone or changed next
    leaving[:-1] = differs & (content[:-1, :, 1] > 0)
    changed = arrived | leaving
    out = torch.zeros(patches, g * g, dtype=torch.long)
    for p in sorted({int(f) // TEMPORAL for f in scene["query"]["key"]}):
        out[p] = changed[p].long()
    return out.reshape(patches * g * g)


def video_batch_labels(items: Sequence[QAItem]) -> torch.Tensor:
    """``[n_videos, P * G * G, 5]`` targets of the video items in ``items`` (other modalities are skipped).

    Columns as :func:`mmtok.testbed.dense.batch_labels`: colour, shape, character ("none"), key flag and
    answer-word order (0: video answers are not read off cells in order).

    Raises:
        ValueError: ``items`` holds no video.
    """
    rows = []
    for it in items:
        if it.modality != "video":
            continue
        lab = video_cell_labels(it.scene)
        key = video_key_cells(it.scene, lab)
        rows.append(torch.cat([lab, key[:, None], torch.zeros_like(key)[:, None]], 1))
    if not rows:
        raise ValueError("video_batch_labels needs at least one video item")
    return torch.stack(rows)
