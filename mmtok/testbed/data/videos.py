"""Video task families: short events among static and moving distractors.

A video is ``VIDEO_FRAMES`` RGB frames of ``VIDEO_SIZE`` x ``VIDEO_SIZE`` (16 x 336 x 336 at ``VIDEO_FPS``)
on a static grey clutter background (see :mod:`mmtok.testbed.data.images`), laid out on the merged-token
grid of the shipped ``testbed-qwen2vl``: its processor keeps 336 px frames as they are (no resampling),
cuts 14 px patches of ``TEMPORAL`` = 2 frames and merges 2 x 2 of them, so one video token covers a
``CELL`` = 28 px cell (12 x 12 per frame) of one temporal patch (frames ``2p, 2p + 1``): 8 x 12 x 12 =
1,152 tokens. An ordinary object (17-23 px) is centred in one cell and keeps a gap of at least 4 px to its
neighbours; a moving object steps by whole cells from one temporal patch to the next. Every object's state
(visible or not, cell, colour) is the same in both frames of a temporal patch, so every event (an
appearance, a flash, a step of a move, a colour change) starts on an even frame and lasts whole temporal
patches; the one exception is motion itself: in the patch before each step, a mover's second frame is
already ``MOTION_SHIFT`` px on its way to the next cell (its centre stays in its cell), as a camera that
samples a moving object twice per patch would see it. So, as in real video, a temporal patch of a moving
object shows which way it moves (Qwen2-VL's patch embedding spans both frames), while the cells and
events stay whole patches. Events last one or two temporal patches or are one or two apart, so a
compressor that drops the wrong tokens loses the answer. Within one video every
object has its own (colour, shape) pair (in the colour-change family, its own shape), objects never
overlap in any frame, and the scene lists, per frame, every visible object.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmtok.testbed.data.images import Layout, draw_shape, texture
from mmtok.testbed.data.items import (
    COLOUR_NAMES,
    COLOURS,
    COMBOS,
    SHAPES,
    Draft,
    Family,
    Retry,
    mc_choices,
    pick,
    vocab_of,
)

VIDEO_SIZE = 336
VIDEO_FRAMES = 16
VIDEO_FPS = 4.0
CELL = 28  # layout grid pitch: one merged token of testbed-qwen2vl (14 px patches, 2 x 2 merge)
TEMPORAL = 2  # frames per temporal patch of testbed-qwen2vl: events start on even frames
PATCHES = VIDEO_FRAMES // TEMPORAL
# px a mover has travelled towards its next cell in the second frame of the patch before a step (dominant
# axis): less than half a cell, so its centre stays in its cell, and under an object's size (17-23 px), so
# the two frames of the patch overlap and one token's patch shows the motion.
MOTION_SHIFT = 10
FLASH_COUNTS = ("1", "2", "3", "4")
DIRECTIONS = ("left", "right", "up", "down")
# Inclusive frame ranges, whole temporal patches, one patch away from the thirds' edges (frames 5.3, 10.7).
PARTS = {"beginning": (0, 3), "middle": (6, 9), "end": (12, 15)}


def render_video(scene: dict[str, Any]) -> list[Image.Image]:
    """Draw each frame: the shared background, then that frame's visible objects."""
    base = texture(scene["background"], scene["size"]).convert("RGB")
    frames = []
    for visible in scene["frames"]:
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for obj in visible:
            draw_shape(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
        frames.append(img)
    return frames


def motion_shift(dx: int, dy: int) -> tuple[int, int]:
    """``(x, y)`` px a mover is on its way in the second frame of a patch before a step of ``(dx, dy)`` cells.

    :data:`MOTION_SHIFT` px along the step's larger axis, the other axis in proportion (a diagonal step
    shifts diagonally); ``(0, 0)`` when the object does not step.
    """
    longest = max(abs(dx), abs(dy))
    if longest == 0:
        return 0, 0
    return round(MOTION_SHIFT * dx / longest), round(MOTION_SHIFT * dy / longest)


def _patch_frames(patches: set[int] | range) -> set[int]:
    """The frames of the temporal patches ``patches``."""
    return {TEMPORAL * p + i for p in patches for i in range(TEMPORAL)}


class _Video:
    """Collects object tracks (a box or ``None`` per frame, and a colour per frame) into a scene."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.lay = Layout(rng, VIDEO_SIZE, cell=CELL)
        self.tracks: list[tuple[list[str], str, list[list[int] | None]]] = []

    def size(self) -> int:
        return int(self.rng.integers(17, 24))  # one cell with the layout's 4 px gap: at most CELL - 4

    def still(self, name: str, frames: set[int] | None = None) -> list[int]:
        """A static object, visible in ``frames`` (default: all)."""
        colour, shape = name.split()
        box = self.lay.place(self.size())
        self.tracks.append(([colour] * VIDEO_FRAMES, shape, [box if frames is None or t in frames else None
                                                            for t in range(VIDEO_FRAMES)]))
        return box

    def mover(self, name: str, dx: int, dy: int, p0: int, steps: int) -> None:
        """An object that moves by ``(dx, dy)`` cells over temporal patches ``p0 + 1 .. p0 + steps``.

        It rests before and after, and moves by whole cells from one temporal patch to the next; in the
        second frame of each patch before a step it is :func:`motion_shift` px on its way.
        """
        colour, shape = name.split()
        s = self.size()
        # The sweep of a cell-snapped box is centred in the block of cells the object passes over; every
        # frame's box, the shifted ones included, lies inside it, so a mover never overlaps another object.
        sweep = self.lay.place(s + CELL * abs(dx), s + CELL * abs(dy))
        x0 = sweep[0] + (CELL * abs(dx) if dx < 0 else 0)
        y0 = sweep[1] + (CELL * abs(dy) if dy < 0 else 0)
        cells = []  # per temporal patch, the (column, row) offset in cells from the start
        for p in range(PATCHES):
            f = min(max((p - p0) / steps, 0.0), 1.0)
            cells.append((round(f * dx), round(f * dy)))
        boxes: list[list[int] | None] = []
        for t in range(VIDEO_FRAMES):
            p = t // TEMPORAL
            (cx, cy), (sx, sy) = cells[p], (0, 0)
            if t % TEMPORAL == TEMPORAL - 1 and p + 1 < PATCHES:
                sx, sy = motion_shift(cells[p + 1][0] - cx, cells[p + 1][1] - cy)
            x, y = x0 + CELL * cx + sx, y0 + CELL * cy + sy
            boxes.append([x, y, x + s, y + s])
        self.tracks.append(([colour] * VIDEO_FRAMES, shape, boxes))

    def scene(self, query: dict[str, Any]) -> dict[str, Any]:
        order = self.rng.permutation(len(self.tracks))
        frames = []
        for t in range(VIDEO_FRAMES):
            visible = []
            for i in order:
                colours, shape, boxes = self.tracks[i]
                if boxes[t] is not None:
                    visible.append({"id": int(i), "colour": colours[t], "shape": shape, "box": boxes[t]})
            frames.append(visible)
        return {"size": VIDEO_SIZE, "n_frames": VIDEO_FRAMES, "fps": VIDEO_FPS,
                "background": int(self.rng.integers(2**31)), "frames": frames, "query": query}


def _names(rng: np.random.Generator, n: int) -> list[str]:
    return [COMBOS[int(i)] for i in rng.choice(len(COMBOS), size=n, replace=False)]


def _flashes(rng: np.random.Generator, k: int, part: tuple[int, int] = (0, VIDEO_FRAMES - 1)) -> set[int]:
    """Frames of ``k`` flashes of 1-2 temporal patches each, at least one dark patch apart, inside ``part``."""
    lo, hi = part[0] // TEMPORAL, part[1] // TEMPORAL
    lengths = rng.integers(1, 3, size=k)
    slack = hi - lo + 1 - int(lengths.sum()) - (k - 1)
    while slack < 0 and (lengths > 1).any():  # too long for the part: shorten random flashes to one patch
        lengths[pick(rng, np.flatnonzero(lengths > 1))] = 1
        slack += 1
    if slack < 0:
        raise Retry
    extra = rng.multinomial(slack, [1 / (k + 1)] * (k + 1))
    patches, p = set(), lo + int(extra[0])
    for i, n in enumerate(lengths):
        patches.update(range(p, p + int(n)))
        p += int(n) + 1 + int(extra[i + 1])
    return _patch_frames(patches)


def _order(rng: np.random.Generator, last: bool) -> Draft:
    v = _Video(rng)
    k, n_still = int(rng.integers(3, 5)), int(rng.integers(2, 4))
    names = _names(rng, k + n_still)
    gaps = rng.integers(1, 3, size=k - 1)  # in temporal patches
    p1 = int(rng.integers(1, PATCHES - int(gaps.sum())))
    times = [TEMPORAL * (p1 + int(g)) for g in np.concatenate([[0], np.cumsum(gaps)])]
    for name, t in zip(names[:k], times, strict=True):
        v.still(name, set(range(t, VIDEO_FRAMES)))
    for name in names[k:]:
        v.still(name)
    answer = names[k - 1] if last else names[0]
    question = f"which object appeared {'last' if last else 'first'} ?"
    # "answer_key": the frame where the answer itself appears (the dense targets point the answer at it).
    query = {"key": times, "answer_key": [times[-1] if last else times[0]]}
    return Draft(v.scene(query), question, answer, mc_choices(rng, answer, COMBOS, hard=names))


def _flash_count(rng: np.random.Generator) -> Draft:
    v = _Video(rng)
    n_flash, n_still = int(rng.integers(1, 3)), int(rng.integers(2, 4))
    names = _names(rng, 1 + n_flash + n_still)
    k = int(rng.integers(1, 5))
    frames = _flashes(rng, k)
    target = len(v.tracks)  # the named object's track: its "id" in the scene
    v.still(names[0], frames)
    for name in names[1:1 + n_flash]:
        v.still(name, _flashes(rng, int(rng.integers(1, 5))))
    for name in names[1 + n_flash:]:
        v.still(name)
    answer = str(k)
    question = f"how many times did the {names[0]} flash ?"
    # The answer is read off the named object's last flash ("answer_key", "answer_id"), whose tokens are its
    # k-th appearance (the dense training's appearance read-out names it), not off another flasher's.
    query = {"key": sorted(frames), "answer_key": _last_run(frames), "answer_id": target}
    return Draft(v.scene(query), question, answer, mc_choices(rng, answer, FLASH_COUNTS))


def _last_run(frames: set[int]) -> list[int]:
    """The frames of the last run of consecutive temporal patches among ``frames`` (whole patches)."""
    patches = sorted({f // TEMPORAL for f in frames})
    start = len(patches) - 1
    while start > 0 and patches[start - 1] == patches[start] - 1:
        start -= 1
    return sorted(_patch_frames(patches[start:]))


def _displacement(rng: np.random.Generator, direction: str | None = None) -> tuple[int, int]:
    """A move of 2-3 cells (56-84 px), in ``direction`` or at a random angle (rounded to whole cells)."""
    dist = int(rng.integers(2, 4))
    if direction is None:
        angle = rng.uniform(0, 2 * np.pi)
        return round(dist * np.cos(angle)), round(dist * np.sin(angle))
    return {"left": (-dist, 0), "right": (dist, 0), "up": (0, -dist), "down": (0, dist)}[direction]


def _window(rng: np.random.Generator) -> tuple[int, int]:
    """``(p0, steps)``: a move over 1-2 temporal patches, with at least one patch of rest before and after."""
    steps = int(rng.integers(1, 3))
    return int(rng.integers(0, PATCHES - steps - 1)), steps


def _move_frames(p0: int, steps: int) -> list[int]:
    """The frames of the last patch at rest before a move and of the patches it moves over."""
    return sorted(_patch_frames(range(p0, p0 + steps + 1)))


def _moved(rng: np.random.Generator) -> Draft:
    v = _Video(rng)
    names = _names(rng, 1 + int(rng.integers(3, 6)))
    p0, steps = _window(rng)
    v.mover(names[0], *_displacement(rng), p0, steps)
    for name in names[1:]:
        v.still(name)
    frames = _move_frames(p0, steps)
    # The answer is the mover itself: its answer_key frames are the move's, whose object tokens name it.
    query = {"key": frames, "answer_key": frames}
    return Draft(v.scene(query), "which object moved ?", names[0], mc_choices(rng, names[0], COMBOS, hard=names))


def _direction(rng: np.random.Generator) -> Draft:
    v = _Video(rng)
    names = _names(rng, 2 + int(rng.integers(2, 5)))
    direction = pick(rng, DIRECTIONS)
    p0, steps = _window(rng)
    target = len(v.tracks)  # the named mover's track: its "id" in the scene
    v.mover(names[0], *_displacement(rng, direction), p0, steps)
    other = pick(rng, [d for d in DIRECTIONS if d != direction])
    v.mover(names[1], *_displacement(rng, other), *_window(rng))
    for name in names[2:]:
        v.still(name)
    frames = _move_frames(p0, steps)
    # The answer is read off the named mover's own tokens ("answer_id"), not the other mover's, in the patches
    # that show it on its way (before each step), not where it has arrived.
    query = {"key": frames, "answer_key": sorted(_patch_frames(range(p0, p0 + steps))), "answer_id": target}
    return Draft(v.scene(query), f"which way did the {names[0]} move ?", direction,
                 mc_choices(rng, direction, DIRECTIONS))


def _change(rng: np.random.Generator) -> Draft:
    v = _Video(rng)
    shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=int(rng.integers(3, 6)), replace=False)]
    for shape in shapes:
        v.still(f"{pick(rng, COLOUR_NAMES)} {shape}")
    t = TEMPORAL * int(rng.integers(2, 7))  # the first frame of the new colour: 4-12, a temporal patch's start
    colours = v.tracks[0][0]
    new = pick(rng, [c for c in COLOUR_NAMES if c != colours[0]])
    colours[t:] = [new] * (VIDEO_FRAMES - t)
    answer = shapes[0]
    return Draft(v.scene({"key": list(range(t - TEMPORAL, t + TEMPORAL))}), "which shape changed colour ?", answer,
                 mc_choices(rng, answer, SHAPES, hard=shapes))


def _when(rng: np.random.Generator) -> Draft:
    v = _Video(rng)
    n_flash, n_still = int(rng.integers(1, 3)), int(rng.integers(2, 4))
    names = _names(rng, 1 + n_flash + n_still)
    part = pick(rng, tuple(PARTS))
    frames = _flashes(rng, 1, PARTS[part])
    v.still(names[0], frames)
    for name in names[1:1 + n_flash]:
        v.still(name, _flashes(rng, 1, PARTS[pick(rng, [p for p in PARTS if p != part])]))
    for name in names[1 + n_flash:]:
        v.still(name)
    question = f"when did the {names[0]} flash : beginning , middle or end ?"
    return Draft(v.scene({"key": sorted(frames)}), question, part, mc_choices(rng, part, tuple(PARTS), k=3))


def _family(name: str, fn: Any, description: str, chance: float, n_choices: int, templates: tuple[str, ...],
            answers: tuple[str, ...]) -> Family:
    return Family(name, "video", description, fn, render_video, chance, n_choices, vocab_of(templates, answers))


FAMILIES: tuple[Family, ...] = (
    _family("first", lambda rng: _order(rng, last=False), "which object appeared first", 1 / len(COMBOS), 4,
            ("which object appeared first ?",), COMBOS),
    _family("last", lambda rng: _order(rng, last=True), "which object appeared last", 1 / len(COMBOS), 4,
            ("which object appeared last ?",), COMBOS),
    _family("flash_count", _flash_count, "how many times an object flashed (flashes of 1-2 temporal patches)",
            1 / len(FLASH_COUNTS), 4, ("how many times did the {colour} {shape} flash ?",), FLASH_COUNTS),
    _family("moved", _moved, "which object moved (by whole cells, over 1-2 temporal patches)", 1 / len(COMBOS), 4,
            ("which object moved ?",), COMBOS),
    _family("direction", _direction, "which way a named object moved", 1 / len(DIRECTIONS), 4,
            ("which way did the {colour} {shape} move ?",), DIRECTIONS),
    _family("change", _change, "which shape changed colour between the start and the end", 1 / len(SHAPES), 4,
            ("which shape changed colour ?",), SHAPES),
    _family("when", _when, "in which part of the video a named object flashed", 1 / len(PARTS), 3,
            ("when did the {colour} {shape} flash : beginning , middle or end ?",), tuple(PARTS)),
)
