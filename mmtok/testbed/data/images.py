"""Image task families: small key objects among distractors on a textured grey background.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB (336 px), laid out on a grid of ``CELL`` = 21 px cells
(16 x 16, the patch grid of the shipped ``testbed-llava``): an ordinary object (11-17 px) is centred in one
cell, the largest object of its family fills a 2 x 2 block, the box outline a 3 x 3 block and each label
character a cell of its own. So a key object is one visual token of that model (and a few tokens of a
14 px-patch model): a compressor that drops it loses the answer, and counting objects is counting
tokens. The background is grey (R = G = B, values 45-210) with grey strokes, so objects, the white label
and the black box outline are the only non-grey pixels; objects never overlap and keep a gap of at least
4 px, so each is one connected colour component (the checker relies on it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmtok.testbed.data.items import (
    ALPHABET,
    BLACK,
    COLOUR_NAMES,
    COLOURS,
    COMBOS,
    PLURALS,
    SHAPES,
    WHITE,
    Draft,
    Family,
    Retry,
    mc_choices,
    pick,
    vocab_of,
)

IMAGE_SIZE = 336
CELL = 21  # layout grid pitch: the patch size of testbed-llava (336 / 21 = 16 cells per side)
QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
NUMBERS = ("1", "2", "3", "4", "5", "6")
FRAME_WIDTH = 2
LABEL_PAD = 4


# ----------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=4)
def _texture_bases(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear upsampling from 6 to ``size`` (left index, right weight) and a fixed grain tile (int16)."""
    pos = np.clip((np.arange(size) + 0.5) * 6 / size - 0.5, 0, 5)
    lo = np.minimum(np.floor(pos).astype(np.int64), 4)
    frac = (pos - lo).astype(np.float32)
    grain = np.random.default_rng(12345).integers(-12, 13, size=(2 * size, 2 * size), dtype=np.int16)
    return lo, frac, grain


def texture(seed: int, size: int) -> Image.Image:
    """Grey clutter background (mode ``"L"``): smooth blotches, grain, and random grey strokes and rings."""
    rng = np.random.default_rng(seed)
    lo, frac, grain = _texture_bases(size)
    coarse = rng.uniform(75.0, 180.0, size=(6, 6)).astype(np.float32)
    oy, ox = (int(v) for v in rng.integers(0, size, 2))
    # Separable bilinear upsampling by indexing (no BLAS call: numpy's threaded matmul stalls on busy CPUs).
    rows = coarse[lo] * (1 - frac)[:, None] + coarse[lo + 1] * frac[:, None]
    base = rows[:, lo] * (1 - frac)[None, :] + rows[:, lo + 1] * frac[None, :]
    base = base + grain[oy:oy + size, ox:ox + size]
    img = Image.fromarray(np.clip(base, 45, 210).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 12))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(45, 211)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(8, 40))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=int(rng.integers(45, 211)),
                     width=int(rng.integers(1, 3)))
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], fill: tuple[int, int, int]) -> None:
    """Fill ``shape`` so that its pixels span exactly ``box = [x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    r, b = x1 - 1, y1 - 1
    cx, cy = (x0 + r) // 2, (y0 + b) // 2
    if shape == "circle":
        draw.ellipse([x0, y0, r, b], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, r, b], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, b), (cx, y0), (r, b)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=fill)
    elif shape == "cross":
        s = x1 - x0
        t = max(2, round(s / 3))
        a = (s - t) // 2
        draw.rectangle([x0 + a, y0, x0 + a + t - 1, b], fill=fill)
        draw.rectangle([x0, y0 + a, r, y0 + a + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded default font at ``size`` px (available offline)."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=16)
def label_metrics(font_size: int) -> tuple[int, int, int]:
    """``(pitch, top, bottom)``: character cell width and the ink rows over all of ``ALPHABET``."""
    boxes = [font(font_size).getbbox(ch) for ch in ALPHABET]
    return max(b[2] for b in boxes) + 2, min(b[1] for b in boxes), max(b[3] for b in boxes)


def render_image(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene: background, objects, the optional box outline and the optional label."""
    img = texture(scene["background"], scene["size"]).convert("RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        draw_shape(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
    if "frame" in scene:
        x0, y0, x1, y1 = scene["frame"]["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BLACK, width=scene["frame"]["width"])
    if "label" in scene:
        label = scene["label"]
        x0, y0, x1, y1 = label["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=WHITE)
        pitch, top, _ = label_metrics(label["font_size"])
        pitch = label.get("pitch", pitch)
        pad_x, pad_y = label.get("pad", (LABEL_PAD, LABEL_PAD))
        for i, ch in enumerate(label["text"]):
            draw.text((x0 + pad_x + i * pitch, y0 + pad_y - top), ch, fill=BLACK,
                      font=font(label["font_size"]))
    return img


# ----------------------------------------------------------------------------------------- layout


class Layout:
    """Random non-overlapping placement of boxes on a canvas, optionally snapped to a grid of cells.

    With ``cell`` set, a ``w`` x ``h`` box is centred in a block of ``ceil((w + gap) / cell)`` cells per side
    (so boxes in distinct blocks keep ``gap`` pixels apart), and regions are honoured box-wise.
    """

    def __init__(self, rng: np.random.Generator, size: int, gap: int = 4, border: int = 4,
                 cell: int | None = None) -> None:
        self.rng, self.size, self.gap, self.border, self.cell = rng, size, gap, border, cell
        self.boxes: list[list[int]] = []

    def free(self, box: list[int]) -> bool:
        """Whether ``box`` keeps ``gap`` pixels from every reserved box."""
        g = self.gap
        return all(box[2] + g <= b[0] or b[2] + g <= box[0] or box[3] + g <= b[1] or b[3] + g <= box[1]
                   for b in self.boxes)

    def _grid_range(self, c: int, lo: int, hi: int, w: int) -> tuple[int, int, int]:
        """``(first, last, offset)``: cells (pitch ``c``) whose centred ``w``-px box lies in ``[lo, hi)``."""
        k = -(-(w + self.gap) // c)
        off = (k * c - w) // 2
        first = max(0, -(-(lo - off) // c))
        last = min((hi - w - off) // c, (self.size - off - w) // c)
        return first, last, off

    def place(self, w: int, h: int | None = None, region: tuple[int, int, int, int] | None = None,
              tries: int = 200) -> list[int]:
        """Reserve and return a free ``w`` x ``h`` box inside ``region`` (default: the canvas less a border)."""
        h = w if h is None else h
        if self.cell is not None:
            x0, y0, x1, y1 = region if region is not None else (0, 0, self.size, self.size)
            fx, lx, ox = self._grid_range(self.cell, x0, x1, w)
            fy, ly, oy = self._grid_range(self.cell, y0, y1, h)
            if fx > lx or fy > ly:
                raise Retry
            for _ in range(tries):
                x = int(self.rng.integers(fx, lx + 1)) * self.cell + ox
                y = int(self.rng.integers(fy, ly + 1)) * self.cell + oy
                box = [x, y, x + w, y + h]
                if self.free(box):
                    self.boxes.append(box)
                    return box
            raise Retry
        lo, hi = self.border, self.size - self.border
        x0, y0, x1, y1 = region if region is not None else (lo, lo, hi, hi)
        if x1 - x0 < w or y1 - y0 < h:
            raise Retry
        for _ in range(tries):
            x = int(self.rng.integers(x0, x1 - w + 1))
            y = int(self.rng.integers(y0, y1 - h + 1))
            box = [x, y, x + w, y + h]
            if self.free(box):
                self.boxes.append(box)
                return box
        raise Retry


def _layout(rng: np.random.Generator) -> Layout:
    return Layout(rng, IMAGE_SIZE, cell=CELL)


def _obj(lay: Layout, colour: str, shape: str, size: int, region: tuple[int, int, int, int] | None = None
         ) -> dict[str, Any]:
    return {"colour": colour, "shape": shape, "box": lay.place(size, region=region)}


def _size(rng: np.random.Generator, lo: int = 13, hi: int = 17) -> int:
    return int(rng.integers(lo, hi + 1))


def _scene(rng: np.random.Generator, objects: list[dict[str, Any]], query: dict[str, Any], **extra: Any
           ) -> dict[str, Any]:
    order = rng.permutation(len(objects))
    return {"size": IMAGE_SIZE, "background": int(rng.integers(2**31)),
            "objects": [objects[i] for i in order], **extra, "query": query}


def _distractors(rng: np.random.Generator, lay: Layout, n: int, ok: Any, lo: int = 13, hi: int = 17
                 ) -> list[dict[str, Any]]:
    """``n`` objects whose (colour, shape) satisfies ``ok(colour, shape)``."""
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES if ok(c, s)]
    return [_obj(lay, *pick(rng, combos), _size(rng, lo, hi)) for _ in range(n)]


# ----------------------------------------------------------------------------------------- families


def _count(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    n = int(rng.integers(1, 7))
    if rng.integers(2):
        c = pick(rng, COLOUR_NAMES)
        targets = [_obj(lay, c, pick(rng, SHAPES), _size(rng)) for _ in range(n)]
        others = _distractors(rng, lay, int(rng.integers(4, 9)), lambda cc, ss: cc != c)
        question, query = f"how many {c} objects are there ?", {"colour": c}
    else:
        s = pick(rng, SHAPES)
        targets = [_obj(lay, pick(rng, COLOUR_NAMES), s, _size(rng)) for _ in range(n)]
        others = _distractors(rng, lay, int(rng.integers(4, 9)), lambda cc, ss: ss != s)
        question, query = f"how many {PLURALS[s]} are there ?", {"shape": s}
    query["key"] = [t["box"] for t in targets]
    answer = str(n)
    return Draft(_scene(rng, targets + others, query), question, answer, mc_choices(rng, answer, NUMBERS))


def _position(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    half, m = IMAGE_SIZE // 2, 0
    ask_colour = bool(rng.integers(2))
    fixed = pick(rng, SHAPES) if ask_colour else pick(rng, COLOUR_NAMES)
    per_region = {}
    for name, (qx, qy) in QUADRANTS.items():
        region = (qx * half + m, qy * half + m, (qx + 1) * half - m, (qy + 1) * half - m)
        if ask_colour:
            per_region[name] = _obj(lay, pick(rng, COLOUR_NAMES), fixed, _size(rng), region)
        else:
            per_region[name] = _obj(lay, fixed, pick(rng, SHAPES), _size(rng), region)
    region_name = pick(rng, tuple(QUADRANTS))
    target = per_region[region_name]
    n_other = int(rng.integers(4, 9))
    if ask_colour:
        others = _distractors(rng, lay, n_other, lambda c, s: s != fixed)
        question, answer = f"what colour is the {fixed} in the {region_name} quadrant ?", target["colour"]
        hard, pool = [o["colour"] for o in per_region.values()], COLOUR_NAMES
    else:
        others = _distractors(rng, lay, n_other, lambda c, s: c != fixed)
        question = f"what shape is the {fixed} object in the {region_name} quadrant ?"
        answer, hard, pool = target["shape"], [o["shape"] for o in per_region.values()], SHAPES
    query = {"region": region_name, "ask": "colour" if ask_colour else "shape", "key": [target["box"]]}
    objects = list(per_region.values()) + others
    return Draft(_scene(rng, objects, query), question, answer, mc_choices(rng, answer, pool, hard=hard))


def relation_winner(relation: str, a: Sequence[int], b: Sequence[int]) -> int:
    """Which of boxes ``a`` (0) and ``b`` (1) is further ``relation`` ("left", "right", "higher", "lower").

    Compares the boxes' centres on the relation's axis; image y grows downwards, so higher is smaller y.
    The generator answers with it and the dense training targets (:func:`mmtok.testbed.dense.answer_order`)
    mark the object it picks; :mod:`mmtok.testbed.data.check` recomputes answers independently.
    """
    axis = 0 if relation in ("left", "right") else 1
    centre_a, centre_b = a[axis] + a[axis + 2], b[axis] + b[axis + 2]
    return 0 if (centre_a < centre_b) == (relation in ("left", "higher")) else 1


def _relation(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    relation = pick(rng, ("left", "right", "higher", "lower"))
    i, j = rng.choice(len(COMBOS), size=2, replace=False)
    a_name, b_name = COMBOS[int(i)], COMBOS[int(j)]
    a = _obj(lay, *a_name.split(), _size(rng))
    axis = 0 if relation in ("left", "right") else 1
    for _ in range(50):
        b = _obj(lay, *b_name.split(), _size(rng))
        ca, cb = (a["box"][axis] + a["box"][axis + 2]) / 2, (b["box"][axis] + b["box"][axis + 2]) / 2
        if abs(ca - cb) >= 24:
            break
        lay.boxes.pop()
    else:
        raise Retry
    answer = (a_name, b_name)[relation_winner(relation, a["box"], b["box"])]
    first, second = (a_name, b_name) if rng.integers(2) else (b_name, a_name)
    others = _distractors(rng, lay, int(rng.integers(6, 11)), lambda c, s: f"{c} {s}" not in (a_name, b_name))
    lead = f"which is further {relation}" if axis == 0 else f"which is {relation}"
    question = f"{lead} , the {first} or the {second} ?"
    query = {"relation": relation, "key": [a["box"], b["box"]]}
    return Draft(_scene(rng, [a, b, *others], query), question, answer, mc_choices(rng, answer, (first, second)))


def _read(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    length = int(rng.integers(3, 5))
    text = "".join(pick(rng, ALPHABET) for _ in range(length))
    font_size = int(rng.integers(14, 17))
    width, top, bottom = label_metrics(font_size)
    # One character per grid cell, centred in it: a label of n characters is n visual tokens.
    box = lay.place(length * CELL - lay.gap, CELL - lay.gap)
    pad = [(CELL - (width - 2)) // 2 - lay.gap // 2, (CELL - lay.gap - (bottom - top)) // 2]
    others = _distractors(rng, lay, int(rng.integers(6, 11)), lambda c, s: True)
    answer = " ".join(text)
    wrong = []
    while len(wrong) < 3:
        pos = int(rng.integers(length))
        alt = text[:pos] + pick(rng, ALPHABET.replace(text[pos], "")) + text[pos + 1:]
        if " ".join(alt) not in wrong:
            wrong.append(" ".join(alt))
    label = {"box": box, "text": text, "font_size": font_size, "pitch": CELL, "pad": pad}
    return Draft(_scene(rng, others, {"key": [box]}, label=label), "what does the label say ?", answer,
                 mc_choices(rng, answer, wrong))


def _odd_one_out(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    ask_colour = bool(rng.integers(2))
    if ask_colour:
        odd = pick(rng, COLOUR_NAMES)
        common = pick(rng, [c for c in COLOUR_NAMES if c != odd])
        shape = pick(rng, SHAPES)
        target = _obj(lay, odd, shape, _size(rng))
        rest = [_obj(lay, common, shape, _size(rng)) for _ in range(int(rng.integers(4, 9)))]
        question, pool, hard = "what colour is the odd one out ?", COLOUR_NAMES, [common]
    else:
        odd = pick(rng, SHAPES)
        common = pick(rng, [s for s in SHAPES if s != odd])
        colour = pick(rng, COLOUR_NAMES)
        target = _obj(lay, colour, odd, _size(rng))
        rest = [_obj(lay, colour, common, _size(rng)) for _ in range(int(rng.integers(4, 9)))]
        question, pool, hard = "what shape is the odd one out ?", SHAPES, [common]
    query = {"ask": "colour" if ask_colour else "shape", "key": [target["box"]]}
    return Draft(_scene(rng, [target, *rest], query), question, odd, mc_choices(rng, odd, pool, hard=hard))


def _inside(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    frame = lay.place(3 * CELL - lay.gap)  # a 3 x 3 block of cells; the object sits in the middle one
    name = pick(rng, COMBOS)
    size = _size(rng)
    x = frame[0] - lay.gap // 2 + CELL + (CELL - size) // 2
    y = frame[1] - lay.gap // 2 + CELL + (CELL - size) // 2
    target = {"colour": name.split()[0], "shape": name.split()[1], "box": [x, y, x + size, y + size]}
    others = _distractors(rng, lay, int(rng.integers(6, 11)), lambda c, s: f"{c} {s}" != name)
    hard = [f"{o['colour']} {o['shape']}" for o in others]
    scene = _scene(rng, [target, *others], {"key": [frame]}, frame={"box": frame, "width": FRAME_WIDTH})
    return Draft(scene, "which object is inside the box ?", name, mc_choices(rng, name, COMBOS, hard=hard))


def _largest(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    sizes = [_size(rng, 11, 15) for _ in range(int(rng.integers(6, 11)))]
    big = _size(rng, 32, 2 * CELL - lay.gap)  # fills a 2 x 2 block of cells
    ask_colour = bool(rng.integers(2))
    colour, shape = pick(rng, COLOUR_NAMES), pick(rng, SHAPES)
    target = _obj(lay, colour, shape, big)
    others = [_obj(lay, pick(rng, COLOUR_NAMES), pick(rng, SHAPES), s) for s in sizes]
    if ask_colour:
        question, answer, pool = "what colour is the largest object ?", colour, COLOUR_NAMES
        hard = [o["colour"] for o in others]
    else:
        question, answer, pool = "what shape is the largest object ?", shape, SHAPES
        hard = [o["shape"] for o in others]
    query = {"ask": "colour" if ask_colour else "shape", "key": [target["box"]]}
    return Draft(_scene(rng, [target, *others], query), question, answer,
                 mc_choices(rng, answer, pool, hard=hard))


def _exists(rng: np.random.Generator) -> Draft:
    lay = _layout(rng)
    colour, shape = pick(rng, COLOUR_NAMES), pick(rng, SHAPES)
    present = bool(rng.integers(2))
    objects = [_obj(lay, colour, shape, _size(rng))] if present else []
    # Hard negatives: about half the distractors share the colour or the shape, never both.
    n = int(rng.integers(8, 13))
    near = _distractors(rng, lay, n // 2, lambda c, s: (c == colour) != (s == shape))
    far = _distractors(rng, lay, n - n // 2, lambda c, s: c != colour and s != shape)
    answer = "yes" if present else "no"
    query = {"colour": colour, "shape": shape, "key": [o["box"] for o in objects]}
    return Draft(_scene(rng, objects + near + far, query), f"is there a {colour} {shape} ?", answer,
                 mc_choices(rng, answer, ("yes", "no")))


def _family(name: str, fn: Any, description: str, chance: float, n_choices: int, templates: tuple[str, ...],
            answers: tuple[str, ...]) -> Family:
    return Family(name, "image", description, fn, render_image, chance, n_choices, vocab_of(templates, answers))


_COLOUR_OR_SHAPE = 0.5 / len(COLOUR_NAMES) + 0.5 / len(SHAPES)

FAMILIES: tuple[Family, ...] = (
    _family("count", _count, "how many objects of a colour / shape", 1 / len(NUMBERS), 4,
            ("how many {colour} objects are there ?", "how many {plural} are there ?"), NUMBERS),
    _family("position", _position, "colour / shape of the object in a named quadrant", _COLOUR_OR_SHAPE, 4,
            ("what colour is the {shape} in the {vert} {horiz} quadrant ?",
             "what shape is the {colour} object in the {vert} {horiz} quadrant ?"), COLOUR_NAMES + SHAPES),
    _family("relation", _relation, "which of two named objects is further left / right / up / down", 0.5, 2,
            ("which is further {side} , the {colour} {shape} or the {colour} {shape} ?",
             "which is {updown} , the {colour} {shape} or the {colour} {shape} ?"), COMBOS),
    _family("read", _read, "read a 3-4 character label rendered small",
            0.5 / len(ALPHABET) ** 3 + 0.5 / len(ALPHABET) ** 4, 4, ("what does the label say ?",),
            tuple(ALPHABET)),
    _family("odd_one_out", _odd_one_out, "colour / shape of the one object unlike the others", _COLOUR_OR_SHAPE,
            4, ("what colour is the odd one out ?", "what shape is the odd one out ?"), COLOUR_NAMES + SHAPES),
    _family("inside", _inside, "which object is inside the black box", 1 / len(COMBOS), 4,
            ("which object is inside the box ?",), COMBOS),
    _family("largest", _largest, "colour / shape of the largest object", _COLOUR_OR_SHAPE, 4,
            ("what colour is the largest object ?", "what shape is the largest object ?"), COLOUR_NAMES + SHAPES),
    _family("exists", _exists, "is there an object of a given colour and shape (yes / no)", 0.5, 2,
            ("is there a {colour} {shape} ?",), ("yes", "no")),
)
