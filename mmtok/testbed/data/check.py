"""An independent checker for testbed items: recompute every answer from the scene and from the media.

The generators choose an answer first and build a scene to fit it. This module never calls them: it
parses the question text, then computes the answer twice, with its own code,

1. from the scene description (the object list per image or frame, the event list per clip), and
2. from the rendered media: exact-colour connected components (8-connected, run-length union-find) give
   each object's colour, bounding box and shape (classified from its row-width profile); the label is read
   by matching each glyph against the font's own rendering of every allowed character; audio events come
   from a short-time Fourier transform (onsets, durations, peak frequencies and levels).

It also checks that the media agree with the scene, that the answer is one of the options, that every word
is in the vocabulary, and that the scene hashes into the item's split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmtok.testbed.data import family_info, vocabulary
from mmtok.testbed.data.items import ALPHABET, BLACK, COLOURS, PLURALS, SHAPES, WHITE, QAItem, split_of, words

_NAMES = (*COLOURS, "white", "black")
_RGB = np.array([*COLOURS.values(), WHITE, BLACK], dtype=np.int16)
# Lookup by red value (then confirm green and blue): the palette's red values are distinct.
_BY_RED = np.full(256, -1, dtype=np.int16)
_BY_RED[_RGB[:, 0]] = np.arange(len(_RGB))
if len(set(_RGB[:, 0].tolist())) != len(_RGB):  # pragma: no cover - guards a future palette edit
    raise RuntimeError("the checker's colour lookup needs palette colours with distinct red values")
_SINGULAR = {p: s for s, p in PLURALS.items()}
# Row-width profile (width / box width at these heights) of each shape, from its geometry.
_FRACTIONS = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
_PROFILES = {
    "square": np.ones(5),
    "circle": 2 * np.sqrt(_FRACTIONS * (1 - _FRACTIONS)),
    "triangle": _FRACTIONS.copy(),
    "diamond": 1 - 2 * np.abs(_FRACTIONS - 0.5),
    "cross": np.where(np.abs(_FRACTIONS - 0.5) < 1 / 6, 1.0, 1 / 3),
}
Obj = tuple[str, str, tuple[int, int, int, int]]  # colour, shape, box [x0, y0, x1, y1)


@dataclass
class CheckResult:
    """The outcome of :func:`check` for one item.

    Attributes:
        item_answer: the answer the item carries.
        scene_answer: the answer recomputed from the scene description.
        media_answer: the answer recomputed from the pixels / samples (None when ``media=False``).
        problems: everything found wrong; empty when the item is right.
    """

    item_answer: str
    scene_answer: str | None
    media_answer: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


# ----------------------------------------------------------------------------------------- pixels


def components(index: np.ndarray) -> list[dict[str, Any]]:
    """8-connected components of equal non-negative values of ``index`` ``[H, W]`` (-1 is background).

    Returns:
        One dict per component: ``value``, ``box`` ``(x0, y0, x1, y1)`` (exclusive ends), ``area``, and its
        row runs ``rows`` / ``lengths`` (int arrays).
    """
    h, w = index.shape
    flat = np.concatenate([index, np.full((h, 1), -1, dtype=index.dtype)], axis=1).ravel()
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [flat.size]])
    keep = flat[starts] >= 0
    starts, ends, values_np = starts[keep], ends[keep], flat[starts][keep]
    rows_np = starts // (w + 1)
    a_np, b_np = starts - rows_np * (w + 1), ends - rows_np * (w + 1)
    rows, a, b, values = rows_np.tolist(), a_np.tolist(), b_np.tolist(), values_np.tolist()
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Runs come sorted by (row, start); each run is joined to the previous row's runs it touches.
    prev_lo = prev_hi = cur_lo = 0
    for i in range(len(rows)):
        if i == 0 or rows[i] != rows[i - 1]:
            prev_lo, prev_hi = (cur_lo, i) if i and rows[i - 1] == rows[i] - 1 else (i, i)
            cur_lo = i
        j = prev_lo
        while j < prev_hi and b[j] < a[i]:
            j += 1
        prev_lo = j
        while j < prev_hi and a[j] <= b[i]:
            if values[j] == values[i]:
                parent[root(j)] = root(i)
            j += 1
    if not rows:
        return []
    roots, comp = np.unique([root(i) for i in range(len(rows))], return_inverse=True)
    order = np.argsort(comp, kind="stable")
    splits = np.flatnonzero(np.diff(comp[order])) + 1
    out = []
    for k, members in enumerate(np.split(order, splits)):
        r, lo, hi = rows_np[members], a_np[members], b_np[members]
        out.append({"value": int(values_np[roots[k]]),
                    "box": (int(lo.min()), int(r.min()), int(hi.max()), int(r.max()) + 1),
                    "area": int((hi - lo).sum()), "rows": r, "lengths": hi - lo})
    return out


def colour_index(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 -> ``[...]`` int16: position in (palette colours, white, black), -1 for other pixels."""
    flat = rgb.reshape(-1, 3)
    idx = _BY_RED[flat[:, 0]]
    cand = np.flatnonzero(idx >= 0)  # few pixels: the grey background rarely shares a palette red value
    hit = _RGB[idx[cand]]
    miss = cand[(hit[:, 1] != flat[cand, 1]) | (hit[:, 2] != flat[cand, 2])]
    idx[miss] = -1
    return idx.reshape(rgb.shape[:-1])


def classify_shape(comp: dict[str, Any]) -> str:
    """The shape whose geometric row-width profile is nearest (L1) to the component's."""
    x0, y0, x1, y1 = comp["box"]
    per_row = np.bincount(comp["rows"] - y0, weights=comp["lengths"], minlength=y1 - y0)
    profile = per_row[np.round(_FRACTIONS * (y1 - y0 - 1)).astype(int)] / (x1 - x0)
    return min(_PROFILES, key=lambda s: float(np.abs(_PROFILES[s] - profile).sum()))


def objects_in(rgb: np.ndarray) -> tuple[list[Obj], list[dict[str, Any]]]:
    """Palette objects of one ``[H, W, 3]`` image, and its white / black components (label, box outline)."""
    objs, extra = [], []
    for comp in components(colour_index(rgb)):
        name = _NAMES[comp["value"]]
        if name in COLOURS:
            objs.append((name, classify_shape(comp), comp["box"]))
        else:
            extra.append({**comp, "name": name})
    return objs, extra


def objects_in_frames(frames: np.ndarray) -> list[list[Obj]]:
    """Palette objects of each frame of ``[T, H, W, 3]`` uint8, in one pass (frames stacked, one empty row apart)."""
    t, h, w, _ = frames.shape
    index = np.full((t, h + 1, w), -1, dtype=np.int16)
    index[:, :h] = colour_index(frames)
    out: list[list[Obj]] = [[] for _ in range(t)]
    for comp in components(index.reshape(t * (h + 1), w)):
        name = _NAMES[comp["value"]]
        x0, y0, x1, y1 = comp["box"]
        f = y0 // (h + 1)
        if name in COLOURS:
            local = {**comp, "box": (x0, y0 - f * (h + 1), x1, y1 - f * (h + 1)), "rows": comp["rows"] - f * (h + 1)}
            out[f].append((name, classify_shape(local), local["box"]))
    return out


def read_label(rgb: np.ndarray, box: tuple[int, int, int, int], font_size: int) -> str:
    """Read the characters in a white label by exact glyph matching against the font's rendering."""
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1].min(axis=2).astype(np.int32)
    cols = np.flatnonzero((crop < 255).any(axis=0))
    if cols.size == 0:
        return ""
    groups = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    out = []
    for g in groups:
        glyph = crop[:, g[0]:g[-1] + 1]
        ink_rows = np.flatnonzero((glyph < 255).any(axis=1))
        glyph = glyph[ink_rows[0]:ink_rows[-1] + 1]
        scores = {}
        for ch, tpl in _glyphs(font_size).items():
            if tpl.shape == glyph.shape:
                scores[ch] = float(np.abs(tpl - glyph).mean())
        out.append(min(scores, key=scores.__getitem__) if scores and min(scores.values()) < 16 else "?")
    return "".join(out)


_GLYPH_CACHE: dict[int, dict[str, np.ndarray]] = {}


def _glyphs(font_size: int) -> dict[str, np.ndarray]:
    if font_size not in _GLYPH_CACHE:
        font = ImageFont.load_default(size=font_size)
        tpl = {}
        for ch in ALPHABET:
            img = Image.new("L", (3 * font_size, 3 * font_size), 255)
            ImageDraw.Draw(img).text((font_size, font_size), ch, fill=0, font=font)
            arr = np.asarray(img).astype(np.int32)
            r, c = np.flatnonzero((arr < 255).any(axis=1)), np.flatnonzero((arr < 255).any(axis=0))
            tpl[ch] = arr[r[0]:r[-1] + 1, c[0]:c[-1] + 1]
        _GLYPH_CACHE[font_size] = tpl
    return _GLYPH_CACHE[font_size]


# ----------------------------------------------------------------------------------------- answers


class _Unanswerable(Exception):
    """The question has no single answer on this scene / media."""


def _named(ws: list[str]) -> list[str]:
    """The ``"colour shape"`` names in a question, in order."""
    return [f"{a} {b}" for a, b in zip(ws, ws[1:], strict=False) if a in COLOURS and b in SHAPES]


def _one(found: list[Any], what: str) -> Any:
    if len(found) != 1:
        raise _Unanswerable(f"{len(found)} candidates for {what}")
    return found[0]


def _centre(box: tuple[int, ...] | list[int], axis: int) -> float:
    return (box[axis] + box[axis + 2]) / 2


def image_answer(family: str, question: str, objs: list[Obj], size: int, frame: Any = None,
                 label: str | None = None) -> str:
    """Answer an image question from an object list (and the box outline / label text where asked)."""
    ws = words(question)
    colours = [w for w in ws if w in COLOURS]
    shapes = [w for w in ws if w in SHAPES]
    if family == "count":
        if "objects" in ws:
            return str(sum(c == colours[0] for c, _, _ in objs))
        shape = _SINGULAR[_one([w for w in ws if w in _SINGULAR], "plural")]
        return str(sum(s == shape for _, s, _ in objs))
    if family == "position":
        i = ws.index("quadrant")
        left, top = ws[i - 1] == "left", ws[i - 2] == "top"
        inside = [o for o in objs if (_centre(o[2], 0) < size / 2) == left and (_centre(o[2], 1) < size / 2) == top]
        if ws[1] == "colour":
            return _one([c for c, s, _ in inside if s == shapes[0]], "quadrant object")
        return _one([s for c, s, _ in inside if c == colours[0]], "quadrant object")
    if family == "relation":
        names = _named(ws)
        boxes = [_one([b for c, s, b in objs if f"{c} {s}" == n], n) for n in names]
        axis = 0 if "further" in ws else 1
        first, second = _centre(boxes[0], axis), _centre(boxes[1], axis)
        if first == second:
            raise _Unanswerable("tie")
        smaller = "left" in ws or "higher" in ws
        return names[0] if (first < second) == smaller else names[1]
    if family == "read":
        return " ".join(label or "")
    if family == "odd_one_out":
        attr = 0 if ws[1] == "colour" else 1
        counts = Counter(o[attr] for o in objs)
        if len({o[1 - attr] for o in objs}) != 1:
            raise _Unanswerable("objects differ in more than the asked attribute")
        return _one([v for v, n in counts.items() if n == 1 and len(counts) == 2], "odd value")
    if family == "inside":
        fx0, fy0, fx1, fy1 = frame
        return _one([f"{c} {s}" for c, s, (x0, y0, x1, y1) in objs
                     if fx0 < x0 and fy0 < y0 and x1 < fx1 and y1 < fy1], "object in the box")
    if family == "largest":
        widest = max(b[2] - b[0] for _, _, b in objs)
        obj = _one([o for o in objs if o[2][2] - o[2][0] == widest], "largest")
        return obj[0] if ws[1] == "colour" else obj[1]
    if family == "exists":
        return "yes" if any(c == colours[0] and s == shapes[0] for c, s, _ in objs) else "no"
    raise ValueError(f"unknown image family {family!r}")


def video_answer(family: str, question: str, frames: list[list[Obj]]) -> str:
    """Answer a video question from the per-frame object lists."""
    ws = words(question)
    named = _named(ws)
    seen: dict[str, list[int]] = {}
    boxes: dict[str, list[tuple[int, ...]]] = {}
    for t, objs in enumerate(frames):
        for c, s, b in objs:
            seen.setdefault(f"{c} {s}", []).append(t)
            boxes.setdefault(f"{c} {s}", []).append(tuple(b))
    if family in ("first", "last"):
        appeared = {k: ts[0] for k, ts in seen.items() if ts[0] > 0}
        best = (min if family == "first" else max)(appeared.values())
        return _one([k for k, t in appeared.items() if t == best], "appearance")
    if family == "moved":
        return _one([k for k, bs in boxes.items() if len(set(bs)) > 1], "moving object")
    if family == "change":
        start = {s: c for c, s, _ in frames[0]}
        end = {s: c for c, s, _ in frames[-1]}
        return _one([s for s in start if end.get(s) not in (None, start[s])], "changed shape")
    ts = seen.get(named[0], []) if named else []
    if not ts:
        raise _Unanswerable("the named object is never visible")
    if family == "flash_count":
        return str(sum(1 for i, t in enumerate(ts) if i == 0 or ts[i - 1] != t - 1))
    if family == "when":
        third = (np.mean(ts) + 0.5) * 3 / len(frames)
        return ("beginning", "middle", "end")[min(int(third), 2)]
    if family == "direction":
        bs = boxes[named[0]]
        dx, dy = _centre(bs[-1], 0) - _centre(bs[0], 0), _centre(bs[-1], 1) - _centre(bs[0], 1)
        if abs(dx) == abs(dy):
            raise _Unanswerable("no dominant direction")
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    raise ValueError(f"unknown video family {family!r}")


def audio_answer(family: str, question: str, events: list[dict[str, float]]) -> str:
    """Answer an audio question from events with ``start``, ``dur``, ``f_start``, ``f_end`` and ``level``."""
    events = sorted(events, key=lambda e: e["start"])
    if family == "beep_count":
        return str(len(events))
    if family == "chirp":
        sweeps = [max(e["f_end"] / e["f_start"], e["f_start"] / e["f_end"]) > 1.2 for e in events]
        return "yes" if any(sweeps) else "no"
    if len(events) != 2:
        raise _Unanswerable(f"{len(events)} tones, expected 2")
    attr = {"higher": "f_start", "longer": "dur", "louder": "level"}[family]
    if events[0][attr] == events[1][attr]:
        raise _Unanswerable("tie")
    return "first" if events[0][attr] > events[1][attr] else "second"


def audio_events(wave: np.ndarray, sample_rate: int) -> list[dict[str, float]]:
    """Events found in a waveform: runs of STFT frames whose 260-4000 Hz peak stands out of the noise."""
    n_fft, hop = 512, 160
    win = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), n_fft)[::hop]
    spec = np.abs(np.fft.rfft(win * np.hanning(n_fft), axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    band = np.flatnonzero((freqs >= 260) & (freqs <= 4000))
    sub = spec[:, band]
    k = sub.argmax(axis=1)
    peak = sub[np.arange(len(sub)), k]
    # Sub-bin peak frequency: parabola through the log magnitudes around the peak.
    lm = np.log(sub + 1e-9)
    kk = np.clip(k, 1, len(band) - 2)
    left, mid, right = (lm[np.arange(len(sub)), kk + d] for d in (-1, 0, 1))
    denom = left - 2 * mid + right
    offset = np.where(denom < 0, 0.5 * (left - right) / np.where(denom < 0, denom, -1), 0.0)
    f = freqs[band][kk] + offset * (freqs[1] - freqs[0])
    active = peak > 4 * np.percentile(peak, 20)
    events = []
    idx = np.flatnonzero(active)
    for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if idx.size else []:
        if run.size < 3:
            continue
        q = max(1, run.size // 5)  # frequency / level away from the fades: inner 60 % of the run
        events.append({
            "start": (run[0] * hop + n_fft / 2) / sample_rate,
            "dur": run.size * hop / sample_rate,
            "f_start": float(np.median(f[run[q - 1:q + 1]])),
            "f_end": float(np.median(f[run[run.size - q - 1:run.size - q + 1]])),
            "level": float(np.median(peak[run[q:run.size - q]])),
        })
    return events

# ----------------------------------------------------------------------------------------- check


def _scene_objects(objs: list[dict[str, Any]]) -> list[Obj]:
    return [(o["colour"], o["shape"], tuple(o["box"])) for o in objs]


def _compare_objects(where: str, expected: list[Obj], found: list[Obj]) -> list[str]:
    """Match rendered objects to scene objects (same colour and shape, box within 1 px)."""
    left = list(found)
    problems = []
    for c, s, box in expected:
        match = [o for o in left if o[0] == c and o[1] == s and max(abs(u - v) for u, v in zip(o[2], box,
                                                                                              strict=True)) <= 1]
        if match:
            left.remove(match[0])
        else:
            problems.append(f"{where}: no rendered {c} {s} at {list(box)}")
    problems += [f"{where}: rendered {c} {s} at {list(b)} is not in the scene" for c, s, b in left]
    return problems


def _answer(fn: Any, *args: Any) -> tuple[str | None, str | None]:
    try:
        return fn(*args), None
    except (_Unanswerable, IndexError, KeyError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"


def _check_image(item: QAItem, media: bool) -> tuple[str | None, str | None, list[str]]:
    scene, fam, q = item.scene, item.family, item.question
    expected = _scene_objects(scene["objects"])
    scene_answer, err = _answer(image_answer, fam, q, expected, scene["size"], scene.get("frame", {}).get("box"),
                                scene.get("label", {}).get("text"))
    problems = [f"from scene: {err}"] if err else []
    if not media:
        return scene_answer, None, problems
    rgb = np.asarray(item.media.convert("RGB"))
    objs, extra = objects_in(rgb)
    problems += _compare_objects("image", expected, objs)
    frame = max((e["box"] for e in extra if e["name"] == "black"), key=lambda b: b[2] - b[0], default=None)
    white = [e for e in extra if e["name"] == "white"]
    label = None
    if white and "label" in scene:
        label = read_label(rgb, max(white, key=lambda e: e["area"])["box"], scene["label"]["font_size"])
    media_answer, err = _answer(image_answer, fam, q, objs, rgb.shape[1], frame if fam == "inside" else None, label)
    return scene_answer, media_answer, problems + ([f"from pixels: {err}"] if err else [])


def _check_video(item: QAItem, media: bool) -> tuple[str | None, str | None, list[str]]:
    expected = [_scene_objects(f) for f in item.scene["frames"]]
    scene_answer, err = _answer(video_answer, item.family, item.question, expected)
    problems = [f"from scene: {err}"] if err else []
    if not media:
        return scene_answer, None, problems
    if len(item.media) != len(expected):
        problems.append(f"{len(item.media)} frames, scene has {len(expected)}")
    found = objects_in_frames(np.stack([np.asarray(f.convert("RGB")) for f in item.media]))
    for t, (exp, got) in enumerate(zip(expected, found, strict=False)):
        problems += _compare_objects(f"frame {t}", exp, got)
    media_answer, err = _answer(video_answer, item.family, item.question, found)
    return scene_answer, media_answer, problems + ([f"from pixels: {err}"] if err else [])


def _check_audio(item: QAItem, media: bool) -> tuple[str | None, str | None, list[str]]:
    expected = [{"start": e["start_ms"] / 1000, "dur": e["dur_ms"] / 1000, "f_start": e["f0"], "f_end": e["f1"],
                 "level": e["amplitude"]} for e in item.scene["events"]]
    scene_answer, err = _answer(audio_answer, item.family, item.question, expected)
    problems = [f"from scene: {err}"] if err else []
    if not media:
        return scene_answer, None, problems
    wave = item.media
    if not (isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1):
        return scene_answer, None, [*problems, "audio media must be a 1-D float32 array"]
    if not np.isfinite(wave).all() or np.abs(wave).max() > 1:
        return scene_answer, None, [*problems, "audio samples must be finite and within [-1, 1]"]
    found = audio_events(wave, item.sample_rate or 0)
    if len(found) != len(expected):
        problems.append(f"audio: {len(found)} events heard, scene has {len(expected)}")
    for i, (exp, got) in enumerate(zip(sorted(expected, key=lambda e: e["start"]), found, strict=False)):
        lo, hi = sorted((exp["f_start"], exp["f_end"]))
        heard = (got["f_start"], got["f_end"])
        # A sweep is heard inside its range (the ends are measured inside the fades), in the right direction.
        bad_freq = not all(0.95 * lo <= f <= 1.05 * hi for f in heard) or (
            lo != hi and (heard[1] > heard[0]) != (exp["f_end"] > exp["f_start"]))
        if abs(got["start"] - exp["start"]) > 0.04 or abs(got["dur"] - exp["dur"]) > 0.05 or bad_freq:
            problems.append(f"audio event {i}: heard {got}, scene has {exp}")
    media_answer, err = _answer(audio_answer, item.family, item.question, found)
    return scene_answer, media_answer, problems + ([f"from samples: {err}"] if err else [])


def check(item: QAItem, *, media: bool = True) -> CheckResult:
    """Recompute ``item``'s answer from its scene (and, with ``media``, its pixels / samples) and audit it.

    Args:
        item: an item from :func:`mmtok.testbed.data.item`.
        media: also analyse the pixels / samples (slower: about 5 ms per image, 50 ms per video).

    Returns:
        The :class:`CheckResult`; ``.ok`` is True when both answers equal the item's and nothing else is wrong.

    Raises:
        TypeError: ``item`` is not a :class:`QAItem`.
    """
    if not isinstance(item, QAItem):
        raise TypeError(f"check expects a QAItem, got {type(item).__name__}")
    by_modality = {"image": _check_image, "video": _check_video, "audio": _check_audio}
    scene_answer, media_answer, problems = by_modality[item.modality](item, media)
    if scene_answer is not None and scene_answer != item.answer:
        problems.append(f"scene gives {scene_answer!r}, item says {item.answer!r}")
    if media_answer is not None and media_answer != item.answer:
        problems.append(f"media give {media_answer!r}, item says {item.answer!r}")
    if item.answer not in item.choices or len(set(item.choices)) != len(item.choices):
        problems.append(f"choices {item.choices} must be distinct and contain the answer")
    n_choices = family_info(item.family).n_choices
    if len(item.choices) != n_choices:
        problems.append(f"{len(item.choices)} choices, family has {n_choices}")
    unknown = sorted(set(item.text_words()) - set(vocabulary(item.modality)))
    if unknown:
        problems.append(f"words outside the vocabulary: {unknown}")
    if split_of(item.scene) != item.split:
        problems.append(f"scene hashes into {split_of(item.scene)!r}, item is in {item.split!r}")
    return CheckResult(item.answer, scene_answer, media_answer, problems)
