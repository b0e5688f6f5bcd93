"""The QA item, the shared closed vocabulary, and the seeding / split rules of the testbed generator.

Everything a family module needs to build an item lives here; the family modules (``images``, ``videos``,
``audio``) and the checker import from this file and never from each other's answer code.

Seeding: an item is a pure function of ``(split, family, sub_index, seed)`` (see :func:`item_rng`).
Splits: a scene belongs to the split chosen by a hash of its media-defining description
(:func:`split_of`); a generator redraws until the scene's hash names the requested split, so the same
scene (hence the same pixels or samples) can never be in both the train and the test split.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODALITIES = ("image", "video", "audio")
SPLITS = ("train", "test")
HELDOUT_SPLIT = "test"
FORMS = ("short", "mc", "mixed")

# Saturated colours: no two share a value and none is grey, so the checker can find them by exact RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 10),
    "cyan": (20, 200, 210),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COMBOS = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
WHITE = (255, 255, 255)  # label background (images only)
BLACK = (0, 0, 0)  # box outline and label ink (images only)
# Characters for the reading task: digits and capitals that are hard to confuse at small sizes.
ALPHABET = "23456789ACEFHKLPRTXY"
DIGITS = tuple(str(i) for i in range(10))

# Values of the ``{slot}`` placeholders used in question templates (for the vocabulary).
SLOTS: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "plural": tuple(PLURALS.values()),
    "vert": ("top", "bottom"),
    "horiz": ("left", "right"),
    "side": ("left", "right"),
    "updown": ("higher", "lower"),
}
MC_WORDS = ("options", ":", ",")
_WORD = re.compile(r"\w+|[^\w\s]+")
_SLOT = re.compile(r"\{(\w+)\}")


def words(text: str) -> list[str]:
    r"""Split text into vocabulary words: runs of word characters and runs of punctuation.

    This is the split of ``tokenizers.pre_tokenizers.Whitespace`` (regex ``\w+|[^\w\s]+``), so a
    word-level tokenizer trained with that pre-tokenizer on :func:`mmtok.testbed.data.vocabulary` covers
    every question, choice and answer.
    """
    return _WORD.findall(text)


def vocab_of(templates: Iterable[str], answers: Iterable[str] = ()) -> frozenset[str]:
    """Every word that the ``templates`` (with ``{slot}`` placeholders from ``SLOTS``) and ``answers`` can emit."""
    out: set[str] = set()
    for template in templates:
        for slot in _SLOT.findall(template):
            for value in SLOTS[slot]:
                out.update(words(value))
        out.update(words(_SLOT.sub(" ", template)))
    for answer in answers:
        out.update(words(answer))
    return frozenset(out)


@dataclass(frozen=True, eq=False)
class QAItem:
    """One question about one piece of media, with its exact answer.

    Attributes:
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        family: task family name (see :func:`mmtok.testbed.data.families`).
        split: ``"train"`` or ``"test"``.
        index: index the item was requested with (see :func:`mmtok.testbed.data.item`).
        seed: dataset seed.
        form: ``"short"`` (answer in a few words) or ``"mc"`` (pick one of ``choices``).
        question: the question, lower case, words separated by spaces.
        answer: the exact answer (for ``"mc"`` the text of the right choice).
        choices: the options of the multiple-choice form, the answer among them (kept for both forms).
        media: a PIL RGB image; a list of PIL RGB frames (video); or a float32 waveform ``[samples]`` (audio).
        scene: the JSON-able description the media was rendered from and the answer follows from.
            ``scene["query"]`` holds the question's parameters and ``"key"``: where the answer lies (boxes
            ``[x0, y0, x1, y1)`` in pixels, frame indices, or ``[start_ms, end_ms)`` spans); some video
            questions add ``"answer_key"``, the frames that show the answer's event (the dense training
            targets point the answer at it), and ``"answer_id"`` where that event's object must be told from
            another's (the ``"id"`` of the scene's frame objects).
        sample_rate: audio samples per second (audio only).
        fps: frames per second (video only).
    """

    modality: str
    family: str
    split: str
    index: int
    seed: int
    form: str
    question: str
    answer: str
    choices: tuple[str, ...]
    media: Any
    scene: dict[str, Any] = field(repr=False)
    sample_rate: int | None = None
    fps: float | None = None

    @property
    def prompt(self) -> str:
        """The text shown to a model: the question, followed by the options in the multiple-choice form."""
        if self.form == "mc":
            return f"{self.question} options : {' , '.join(self.choices)}"
        return self.question

    @property
    def target(self) -> str:
        """The text a model should answer with (the same in both forms)."""
        return self.answer

    @property
    def answer_index(self) -> int:
        """Position of the answer in ``choices``."""
        return self.choices.index(self.answer)

    def text_words(self) -> list[str]:
        """Every word of the prompt (both forms) and the answer."""
        return words(self.question) + [w for c in self.choices for w in words(c)] + words(self.answer)


@dataclass(frozen=True)
class Draft:
    """What a family generator returns: the scene and its question, answer and choices (no media yet)."""

    scene: dict[str, Any]
    question: str
    answer: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """A task family: how to draw a scene and question, how to render it, and its chance level.

    Attributes:
        name: unique across modalities.
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        description: one line for reports.
        generate: ``rng -> Draft``; may raise :class:`Retry` when a random layout does not fit.
        render: ``scene -> media``.
        chance_short: accuracy of the best guess that sees the question but not the media.
        n_choices: number of options in the multiple-choice form.
        vocab: every word its questions, choices and answers can contain.
    """

    name: str
    modality: str
    description: str
    generate: Callable[[np.random.Generator], Draft]
    render: Callable[[dict[str, Any]], Any]
    chance_short: float
    n_choices: int
    vocab: frozenset[str]


class Retry(Exception):
    """Raised by a generator when a random layout failed; the caller draws again from the same stream."""


def family_code(name: str) -> int:
    """A stable integer for a family name (so adding a family never changes another family's items)."""
    return zlib.crc32(name.encode())


def item_rng(seed: int, split: str, family: str, sub_index: int) -> np.random.Generator:
    """The random stream of one item, a pure function of its arguments."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), family_code(family),
                                                         sub_index]))


def fingerprint(scene: Mapping[str, Any]) -> str:
    """SHA-256 of the media-defining part of a scene (everything but ``"query"``)."""
    media_part = {k: v for k, v in scene.items() if k != "query"}
    return hashlib.sha256(json.dumps(media_part, sort_keys=True).encode()).hexdigest()


def split_of(scene: Mapping[str, Any]) -> str:
    """The split a scene belongs to: decided by its fingerprint alone, half of all scenes each."""
    return SPLITS[int(fingerprint(scene)[:8], 16) % len(SPLITS)]


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """A uniformly random element of ``seq``."""
    return seq[int(rng.integers(len(seq)))]


def mc_choices(rng: np.random.Generator, answer: str, pool: Sequence[str], k: int = 4,
               hard: Sequence[str] = ()) -> tuple[str, ...]:
    """``k`` distinct options in random order: the answer, the ``hard`` negatives first, then others from ``pool``."""
    hard_unique = [h for h in dict.fromkeys(hard) if h != answer]
    order = rng.permutation(len(hard_unique))
    picks = [hard_unique[i] for i in order][: k - 1]
    rest = [p for p in dict.fromkeys(pool) if p != answer and p not in picks]
    order = rng.permutation(len(rest))
    picks += [rest[i] for i in order][: k - 1 - len(picks)]
    options = [answer, *picks]
    return tuple(options[i] for i in rng.permutation(len(options)))

