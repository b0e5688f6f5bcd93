"""Seeded, reproducible QA items with exact answers, for training and judging the offline testbed models.

Three modalities, each a set of task families whose answers depend on specific regions, frames or moments:

- ``image``: 336 x 336 RGB, :mod:`~mmtok.testbed.data.images` (count, position, relation, read, odd_one_out,
  inside, largest, exists);
- ``video``: 16 frames of 336 x 336 RGB at 4 fps, :mod:`~mmtok.testbed.data.videos` (first, last,
  flash_count, moved, direction, change, when);
- ``audio``: 3 s of 16 kHz mono float32, :mod:`~mmtok.testbed.data.audio` (beep_count, higher, longer,
  louder, chirp).

An item is a pure function of ``(modality, split, index, seed)`` (and the form, which only changes the
prompt). ``"test"`` is the held-out split: a scene's split is fixed by a hash of its description, so no
image, video or clip is in both splits. :func:`mmtok.testbed.data.check.check` recomputes every answer
independently from the scene and from the rendered media.

Example::

    from mmtok.testbed.data import dataset, vocabulary
    for it in dataset("image", "train", n=1000, seed=0, form="mixed"):
        train_step(it.media, it.prompt, it.target)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mmtok.testbed.data import audio, images, videos
from mmtok.testbed.data.items import FORMS, HELDOUT_SPLIT, MC_WORDS, MODALITIES, SPLITS, Family, QAItem, Retry
from mmtok.testbed.data.items import item_rng as _item_rng
from mmtok.testbed.data.items import split_of as _split_of

_BY_MODALITY: dict[str, tuple[Family, ...]] = {
    "image": images.FAMILIES,
    "video": videos.FAMILIES,
    "audio": audio.FAMILIES,
}
_BY_NAME: dict[str, Family] = {f.name: f for fams in _BY_MODALITY.values() for f in fams}
_MAX_DRAWS = 1000

__all__ = [
    "FORMS",
    "HELDOUT_SPLIT",
    "MODALITIES",
    "SPLITS",
    "Family",
    "QAItem",
    "chance",
    "dataset",
    "families",
    "family_info",
    "item",
    "vocabulary",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")
    return str(value)


def families(modality: str) -> list[str]:
    """Names of the task families of ``modality`` (``"image"``, ``"video"`` or ``"audio"``), in index order."""
    _check_choice("modality", modality, MODALITIES)
    return [f.name for f in _BY_MODALITY[modality]]


def family_info(family: str) -> Family:
    """The :class:`Family` record of a family name (modality, description, chance level, vocabulary)."""
    return _BY_NAME[_check_choice("family", family, tuple(_BY_NAME))]


def chance(family: str, form: str = "short") -> float:
    """Accuracy of the best guess from the question alone (and the options, for ``form="mc"``).

    Answers are drawn uniformly by construction, so this is 1 / (number of possible answers) for the short
    form and 1 / (number of options) for the multiple-choice form.
    """
    info = family_info(family)
    _check_choice("form", form, ("short", "mc"))
    return info.chance_short if form == "short" else 1.0 / info.n_choices


def vocabulary(modality: str | None = None) -> list[str]:
    """Every word (see :func:`mmtok.testbed.data.items.words`) that can appear in a question, option or answer.

    Case-sensitive and sorted. Covers one modality, or all when ``modality`` is None.
    """
    mods = MODALITIES if modality is None else (_check_choice("modality", modality, MODALITIES),)
    out: set[str] = set(MC_WORDS)
    for mod in mods:
        for fam in _BY_MODALITY[mod]:
            out |= fam.vocab
    return sorted(out)


def item(modality: str, split: str, index: int, seed: int = 0, *, family: str | None = None,
         form: str = "short") -> QAItem:
    """The ``index``-th item of a dataset; the same arguments always give the same media and text.

    Args:
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        split: ``"train"`` or ``"test"`` (held out).
        index: >= 0. Without ``family``, families take turns (family ``index % F`` of :func:`families`,
            its item ``index // F``), so any prefix of a dataset is balanced; with ``family``, the
            ``index``-th item of that family.
        seed: dataset seed, >= 0.
        family: restrict to one family of ``modality``.
        form: ``"short"``, ``"mc"`` (multiple choice) or ``"mixed"`` (alternating per family item).

    Returns:
        The :class:`QAItem`.

    Raises:
        ValueError: unknown modality, split, family or form, or a negative index or seed.
        TypeError: index or seed not an int.
    """
    fams = _BY_MODALITY[_check_choice("modality", modality, MODALITIES)]
    _check_choice("split", split, SPLITS)
    _check_choice("form", form, FORMS)
    index, seed = _check_int("index", index, 0), _check_int("seed", seed, 0)
    if family is None:
        fam, sub = fams[index % len(fams)], index // len(fams)
    else:
        fam = family_info(family)
        if fam.modality != modality:
            raise ValueError(f"family {family!r} is a {fam.modality} family; {modality} families: "
                             f"{families(modality)}")
        sub = index
    rng = _item_rng(seed, split, fam.name, sub)
    for _ in range(_MAX_DRAWS):
        try:
            draft = fam.generate(rng)
        except Retry:
            continue
        if _split_of(draft.scene) == split:
            break
    else:  # pragma: no cover - each draw lands in the split with probability 1/2
        raise RuntimeError(f"no {split} scene for family {fam.name!r} in {_MAX_DRAWS} draws")
    scene = draft.scene
    return QAItem(
        modality=modality, family=fam.name, split=split, index=index, seed=seed,
        form=("short", "mc")[sub % 2] if form == "mixed" else form,
        question=draft.question, answer=draft.answer, choices=draft.choices, media=fam.render(scene),
        scene=scene, sample_rate=scene.get("sample_rate"), fps=scene.get("fps"),
    )


def dataset(modality: str, split: str, n: int, seed: int = 0, *, families: Sequence[str] | None = None,
            form: str = "short", start: int = 0) -> Iterator[QAItem]:
    """Iterate over items ``start .. start + n - 1`` of a dataset (see :func:`item`).

    With ``families``, those families take turns: item ``i`` is item ``i // len(families)`` of family
    ``families[i % len(families)]``, the same item :func:`item` gives for that family.

    Raises:
        ValueError: bad arguments (checked before the first item is made).
    """
    fams = [f.name for f in _BY_MODALITY[_check_choice("modality", modality, MODALITIES)]]
    _check_choice("split", split, SPLITS)
    _check_choice("form", form, FORMS)
    n, seed, start = _check_int("n", n, 0), _check_int("seed", seed, 0), _check_int("start", start, 0)
    if families is not None:
        if isinstance(families, str) or not families:
            raise ValueError("families must be a non-empty sequence of family names")
        for name in families:
            if name not in fams:
                raise ValueError(f"unknown {modality} family {name!r}; expected some of {fams}")
    return _iterate(modality, split, n, seed, None if families is None else list(families), form, start)


def _iterate(modality: str, split: str, n: int, seed: int, fams: list[str] | None, form: str, start: int
             ) -> Iterator[QAItem]:
    for i in range(start, start + n):
        if fams is None:
            yield item(modality, split, i, seed, form=form)
        else:
            yield item(modality, split, i // len(fams), seed, family=fams[i % len(fams)], form=form)
