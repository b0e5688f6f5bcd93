"""Dense per-token targets of the video items, for training ``testbed-qwen2vl`` (the image ones: ``dense``).

A generated video lays its objects out on the merged-token grid of ``testbed-qwen2vl`` and keeps every
state for whole temporal patches (:mod:`mmtok.testbed.data.videos`; a mover's shift on its way to the next
cell aside, which stays in its cell), so each of its 8 x 12 x 12 video tokens
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
from mmtok.testbed.data.videos import CELL, DIRECTIONS, FLASH_COUNTS, PATCHES, TEMPORAL, VIDEO_SIZE
from mmtok.testbed.dense import COLOUR_CLASSES, SHAPE_CLASSES, class_sums, class_word_ids

# The words of the motion read-out (:func:`motion_terms`): class 0 "no" (the object does not move within its
# temporal patch), then the four directions of :data:`~mmtok.testbed.data.videos.DIRECTIONS`.
MOTION_WORDS = ("no", *DIRECTIONS)
# The words of the appearance read-out (:func:`appearance_terms`): class ``i`` says the token's object is
# visible for the ``i + 1``-th time, the flash counts' answer words.
APPEARANCE_WORDS = FLASH_COUNTS
# Columns of :func:`video_batch_labels`: the probe heads' three, then motion and appearance, then the key and
# order flags.
MOTION_COLUMN = 3
APPEARANCE_COLUMN = 4


def _cell_objects(scene: dict[str, Any]) -> torch.Tensor:
    """``[P, G, G]`` long: the ``id`` of the object under each cell in the first frame of each patch, -1: none.

    Raises:
        ValueError: the frame size is not a multiple of the cell or the frame count not of the patch.
    """
    size, frames = scene["size"], scene["frames"]
    if size % CELL or len(frames) % TEMPORAL:
        raise ValueError(f"a video of {len(frames)} frames of {size} px is not on the {TEMPORAL}-frame x "
                         f"{CELL} px token grid")
    g, patches = size // CELL, len(frames) // TEMPORAL
    out = torch.full((patches, g, g), -1, dtype=torch.long)
    for p in range(patches):
        for obj in frames[p * TEMPORAL]:
            out[(p, *_cell_of(obj["box"]))] = obj["id"]
    return out


def _cell_of(box: Sequence[int]) -> tuple[int, int]:
    """``(row, column)`` of the grid cell under a box's centre."""
    x0, y0, x1, y1 = box
    return ((y0 + y1) // 2) // CELL, ((x0 + x1) // 2) // CELL


def video_cell_labels(scene: dict[str, Any]) -> torch.Tensor:
    """``[P * G * G, 3]`` long: colour, shape and character (always "none") classes per video token.

    Token ``p * G * G + r * G + c`` is temporal patch ``p`` (frames ``2p, 2p + 1``), row ``r``, column ``c``
    of the ``G = size / CELL`` grid (the order of Qwen2-VL's merged video tokens). An object labels the cell
    under its box centre, in the first frame of each patch (both frames of a patch are the same).

    Raises:
        ValueError: the frame size is not a multiple of the cell or the frame count not of the patch.
    """
    objects = _cell_objects(scene)  # validates the grid
    out = torch.zeros(*objects.shape, 3, dtype=torch.long)
    for p in range(objects.shape[0]):
        for obj in scene["frames"][p * TEMPORAL]:
            r, c = _cell_of(obj["box"])
            out[p, r, c, 0] = COLOUR_CLASSES.index(obj["colour"])
            out[p, r, c, 1] = SHAPE_CLASSES.index(obj["shape"])
    return out.reshape(-1, 3)


def video_cell_motion(scene: dict[str, Any], objects: torch.Tensor | None = None) -> torch.Tensor:
    """``[P * G * G]`` long: which way each object token's object moves within its temporal patch, -1: none.

    A temporal patch is two frames (Qwen2-VL's patch embedding spans both), and a generated mover is already
    on its way to its next cell in the second frame of the patch before each step
    (:func:`~mmtok.testbed.data.videos.motion_shift`), so one token's content shows the motion, as a moving
    object's patch does in real video. The class indexes :data:`MOTION_WORDS`: 0 the object has the same box
    in both frames, 1-4 it moved, named by the larger axis of its shift (left, right, up, down; rows grow
    downwards). -1: no object in the cell, an object missing from the patch's second frame, or a diagonal
    shift as long on both axes (no single direction). ``objects``: the scene's ``_cell_objects`` when already
    computed.
    """
    objects = _cell_objects(scene) if objects is None else objects
    patches, g = objects.shape[0], objects.shape[1]
    out = torch.full((patches, g, g), -1, dtype=torch.long)
    for p in range(patches):
        first = {obj["id"]: obj["box"] for obj in scene["frames"][p * TEMPORAL]}
        second = {obj["id"]: obj["box"] for obj in scene["frames"][p * TEMPORAL + TEMPORAL - 1]}
        for r, c in torch.nonzero(objects[p] >= 0).tolist():
            i = int(objects[p, r, c])
            if i not in second:
                continue
            dx, dy = second[i][0] - first[i][0], second[i][1] - first[i][1]
            if abs(dx) > abs(dy):
                out[p, r, c] = 1 if dx < 0 else 2
            elif abs(dy) > abs(dx):
                out[p, r, c] = 3 if dy < 0 else 4
            elif dx == 0:
                out[p, r, c] = 0
    return out.reshape(-1)


def video_cell_appearance(scene: dict[str, Any], objects: torch.Tensor | None = None) -> torch.Tensor:
    """``[P * G * G]`` long: for each object token, which time its object is visible (0: first), -1: none.

    An object's appearances are its runs of consecutive temporal patches in view (as the checker counts a
    flashing object's flashes): a still object is on its first throughout, a flash's object on its ``k``-th
    during its ``k``-th flash. The class indexes :data:`APPEARANCE_WORDS`; -1 for cells without an object and
    for appearances past the last word. ``objects``: the scene's ``_cell_objects`` when already computed.
    """
    objects = _cell_objects(scene) if objects is None else objects
    patches = objects.shape[0]
    out = torch.full_like(objects, -1)
    runs: dict[int, int] = {}
    before: set[int] = set()
    for p in range(patches):
        now = {obj["id"] for obj in scene["frames"][p * TEMPORAL]}
        for i in now - before:
            runs[i] = runs.get(i, 0) + 1
        for i in now:
            if runs[i] <= len(APPEARANCE_WORDS):
                out[p][objects[p] == i] = runs[i] - 1
        before = now
    return out.reshape(-1)


def video_key_cells(scene: dict[str, Any], labels: torch.Tensor | None = None,
                    frames: list[int] | None = None) -> torch.Tensor:
    """``[P * G * G]`` long: 1 on the event tokens of the question's key frames, else 0.

    Args:
        scene: a video scene (``frames``, ``size``, ``query["key"]`` frame indices).
        labels: its :func:`video_cell_labels` when already computed.
        frames: other frames than ``query["key"]`` (e.g. ``query["answer_key"]``).
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
    for p in sorted({int(f) // TEMPORAL for f in (scene["query"]["key"] if frames is None else frames)}):
        out[p] = changed[p].long()
    return out.reshape(patches * g * g)


def video_batch_labels(items: Sequence[QAItem]) -> torch.Tensor:
    """``[n_videos, P * G * G, 7]`` targets of the video items in ``items`` (other modalities are skipped).

    Columns: colour, shape, character ("none") as :func:`mmtok.testbed.dense.batch_labels`; the motion class
    (:func:`video_cell_motion`, column :data:`MOTION_COLUMN`); the appearance class
    (:func:`video_cell_appearance`, column :data:`APPEARANCE_COLUMN`); then, as the image labels end, the key flag and
    the answer-word order: 1 on the event tokens of ``query["answer_key"]`` that show an object (only object
    ``query["answer_id"]`` where the query names one), so the first answer word attends to the object it
    names, as an image relation answer does ("which object appeared first / last": the answer's own
    appearance among all the key appearances; "which object moved": the mover's tokens, not the cells it
    left empty; "which way did X move": X's tokens on its way, whose motion class is the answer, not another
    mover's, nor X where it arrived; "how many times did X flash": X's last flash, whose appearance class is
    the answer); 0 elsewhere.

    Raises:
        ValueError: ``items`` holds no video.
    """
    rows = []
    for it in items:
        if it.modality != "video":
            continue
        lab = video_cell_labels(it.scene)
        key = video_key_cells(it.scene, lab)
        objects, query = _cell_objects(it.scene), it.scene["query"]
        order = torch.zeros_like(key)
        if query.get("answer_key") is not None:
            order = video_key_cells(it.scene, lab, query["answer_key"]) * (lab[:, 1] > 0)  # events showing an object
            if query.get("answer_id") is not None:
                order = order * (objects.reshape(-1) == query["answer_id"])
        motion = video_cell_motion(it.scene, objects)
        appearance = video_cell_appearance(it.scene, objects)
        rows.append(torch.cat([lab, motion[:, None], appearance[:, None], key[:, None], order[:, None]], 1))
    if not rows:
        raise ValueError("video_batch_labels needs at least one video item")
    return torch.stack(rows)


def time_words(tokenizer: Any) -> list[int]:
    """Token ids of the words "1" .. "8" that name a video token's temporal patch in :func:`time_terms`.

    Raises:
        ValueError: the tokenizer lacks one of them.
    """
    ids = [tokenizer.convert_tokens_to_ids(str(p + 1)) for p in range(PATCHES)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the time read-out names temporal patches with the words 1 .. {PATCHES}; this tokenizer "
                         "lacks some of them")
    return ids


def time_terms(logits: torch.Tensor, cells: torch.Tensor, rows: torch.Tensor, words: Sequence[int]
               ) -> tuple[torch.Tensor, int]:
    """Cross-entropy (summed) and count of the video tokens naming their own temporal patch.

    Qwen2-VL's vision tower sees each temporal patch on its own and has no time embedding, so a video
    token's content says nothing of when it is; time reaches the language model only through M-RoPE's
    temporal index, which rotates queries and keys and never enters the tokens themselves. The questions
    about order and timing ("which appeared first", "when did it flash") need the time in the tokens the
    answer position reads. As the relevance marks are (:func:`mmtok.testbed.dense.relevance_loss`), the
    model's own next-word logits after the first layer, restricted to ``words``, are trained at each video
    token to name its temporal patch: the first layer learns to write the M-RoPE time into the token (as
    the 2-D position code gave Llava's image tokens their place, :mod:`mmtok.testbed.position_code`).

    Args:
        logits: ``[B, L, V]`` next-word logits read out after the first layer.
        cells: ``[B, L]`` the index of each media position within its media's tokens, -1 elsewhere.
        rows: ``[B]`` bool, the video rows.
        words: the :func:`time_words`, one per temporal patch.

    Returns:
        The summed cross-entropy and the number of video tokens (0 and 0 without video rows).
    """
    where = (cells >= 0) & rows[:, None]
    if not bool(where.any()):
        return logits.new_zeros((), dtype=torch.float), 0
    patch = cells[where] // ((VIDEO_SIZE // CELL) ** 2)
    chosen = logits[where][:, list(words)].float()
    return torch.nn.functional.cross_entropy(chosen, patch, reduction="sum"), int(where.sum())


def _token_losses(logits: torch.Tensor, cells: torch.Tensor, classes: torch.Tensor, words: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropies over ``words`` of the media tokens that have a class, for the per-token read-outs.

    Args:
        logits: ``[B, L, V]`` next-word logits.
        cells: ``[B, L]`` the index of each media position within its media's tokens, -1 elsewhere.
        classes: ``[B, N]`` per row, each media token's class; -1 where none is defined.
        words: the class words.

    Returns:
        ``[M]`` losses and ``[M]`` classes of the M tokens with a class.
    """
    rows, cols = (cells >= 0).nonzero(as_tuple=True)
    target = classes[rows, cells[rows, cols]]
    defined = target >= 0
    rows, cols, target = rows[defined], cols[defined], target[defined]
    each = torch.nn.functional.cross_entropy(logits[rows, cols][:, list(words)].float(), target, reduction="none")
    return each, target


def motion_words(tokenizer: Any) -> list[int]:
    """Token ids of :data:`MOTION_WORDS`, the classes of :func:`motion_terms`.

    Raises:
        ValueError: the tokenizer lacks one of them.
    """
    return class_word_ids(tokenizer, [MOTION_WORDS])[0]


def motion_terms(logits: torch.Tensor, cells: torch.Tensor, motion: torch.Tensor, words: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy sums and counts of the object tokens naming their motion, over still and moved tokens.

    Which object moved and which way is visible in a mover's own tokens: in the patch before each step its
    second frame is already on its way (:func:`video_cell_motion`). As the time read-out
    (:func:`time_terms`), the model's next-word logits after the first layer, restricted to ``words``, are
    trained at each object token to name that motion: "no", or the direction word of the family's answers.
    The answer position then reads the mover's tokens (``answer_id``'s order marks) and finds the direction
    there. (Stage cpu8 trained this read-out on the step since the previous patch instead, a comparison of
    two patches that only attention could make; after 1,000 steps it stayed near chance.)

    Args:
        logits: ``[B, L, V]`` next-word logits read out after the first layer.
        cells: ``[B, L]`` the index of each media position within its media's tokens, -1 elsewhere.
        motion: ``[B, N]`` per row, the :func:`video_cell_motion` class of each of its media tokens; -1 where
            none is defined and on rows without video (as :meth:`~mmtok.testbed.media_grid.GridBatch.per_row`
            fills them).
        words: the :func:`motion_words`.

    Returns:
        ``[2]`` float sums of the cross-entropies over the still tokens (class 0) and the moved ones (1-4), and
        ``[2]`` long counts, for :func:`~mmtok.testbed.dense.balanced_mean` (a video has ~40 object tokens, of
        which 1-4 moved).
    """
    each, target = _token_losses(logits, cells, motion, words)
    moved = target > 0
    return torch.stack([each[~moved].sum(), each[moved].sum()]), torch.stack([(~moved).sum(), moved.sum()])


def appearance_words(tokenizer: Any) -> list[int]:
    """Token ids of :data:`APPEARANCE_WORDS`, the classes of :func:`appearance_terms`.

    Raises:
        ValueError: the tokenizer lacks one of them.
    """
    return class_word_ids(tokenizer, [APPEARANCE_WORDS])[0]


def appearance_terms(logits: torch.Tensor, cells: torch.Tensor, appearance: torch.Tensor, words: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy sums and counts of the object tokens naming which time their object is visible, per class.

    "How many times did X flash" asks for the number of X's runs in view, a count over time that one
    attention read cannot make: attention averages what it reads. As the motion read-out
    (:func:`motion_terms`) puts a mover's direction into its own tokens, this one puts the ordinal of the
    current appearance into each object token: the model's next-word logits after the first layer,
    restricted to ``words`` (the counts' answer words), are trained to name it (:func:`video_cell_appearance`).
    The answer position then reads the ordinal off X's last flash (the ``answer_key`` / ``answer_id`` order
    marks) and says it.

    Args:
        logits: ``[B, L, V]`` next-word logits read out after the first layer (or the chosen later one).
        cells: ``[B, L]`` the index of each media position within its media's tokens, -1 elsewhere.
        appearance: ``[B, N]`` per row, the :func:`video_cell_appearance` class of each of its media tokens; -1
            where none is defined and on rows without video.
        words: the :func:`appearance_words`.

    Returns:
        ``[K]`` float sums of the cross-entropies over the tokens of each class and ``[K]`` long counts, for
        :func:`~mmtok.testbed.dense.balanced_mean` (most object tokens are still objects, on their first).
    """
    return class_sums(*_token_losses(logits, cells, appearance, words), len(words))
