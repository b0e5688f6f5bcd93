"""The dense supervision's read-outs of a training run, built for its model and checked against its settings.

Each read-out reads a media token through the model's own tied word embeddings (:mod:`mmtok.testbed.dense`):
one :class:`~mmtok.testbed.dense.DenseProbe` per medium of the spec, the words "yes" / "no" of the relevance
marks, and the word sets of the optional video read-outs (time, motion, appearance;
:mod:`mmtok.testbed.dense_video`). A run with ``dense_weight`` 0 has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtok.testbed.data.images import CELL, IMAGE_SIZE
from mmtok.testbed.dense import IMAGE_HEADS, IMAGE_RAMPS, VISUAL_HEADS, DenseProbe, class_word_ids
from mmtok.testbed.dense_audio import AUDIO_HEADS
from mmtok.testbed.dense_step import ATTEND_LAYER, RELEVANCE_LAYER
from mmtok.testbed.dense_video import appearance_words, motion_words, time_words
from mmtok.testbed.media_grid import model_kind, tokens_per_side
from mmtok.testbed.models import TestbedSpec
from mmtok.testbed.train_measures import device_of

_HEADS = {"image": IMAGE_HEADS, "video": VISUAL_HEADS, "audio": AUDIO_HEADS}
_VIDEO_READ_OUTS = (("time_weight", "time"), ("motion_weight", "motion"), ("appearance_weight", "appearance"))


@dataclass
class ReadOuts:
    """A run's read-outs (empty when it trains with the answer loss only).

    Attributes:
        probes: per medium of the spec, its dense probe.
        yes_no: token ids of "yes" and "no" (the relevance marks); None without probes.
        time: token ids of the time read-out's words; None when it is off (so too ``motion``, ``appearance``).
        appearance_layer: after which language-model layer the appearance read-out reads.
        attention_layers: the language-model layers whose head 0 the attention supervision trains.
        relevance_layers: after which language-model layers the relevance marks are read.
        swap_class: the relevance marks weigh a relation's colour-shape swaps as a class of their own.
        lookalike_class: the relevance marks weigh a position question's look-alikes as a class of their own.
    """

    probes: dict[str, DenseProbe] = field(default_factory=dict)
    yes_no: tuple[int, int] | None = None
    time: list[int] | None = None
    motion: list[int] | None = None
    appearance: list[int] | None = None
    appearance_layer: int = 1
    attention_layers: tuple[int, ...] = (ATTEND_LAYER,)
    relevance_layers: tuple[int, ...] = (RELEVANCE_LAYER,)
    swap_class: bool = False
    lookalike_class: bool = False


def make_read_outs(model: Any, processor: Any, spec: TestbedSpec, settings: dict[str, Any], on_grid: bool,
                   shape: Any) -> ReadOuts:
    """The read-outs ``settings`` ask for, on ``model``'s device.

    Args:
        model: the run's model (its input embeddings are the probes' class words).
        processor: its processor (the tokenizer names the class words).
        spec: the testbed's spec (its media get a probe each).
        settings: the run's settings (:mod:`mmtok.testbed.train_settings`, recipe defaults filled in).
        on_grid: whether the model's media tokens lie on the scenes' layout grid.
        shape: the model's size (a size name's entry of ``spec.sizes``), for the error message.

    Raises:
        ValueError: the dense probe off the layout grid, the curriculum on a model other than Llava, the
            position ramp or a video read-out without the dense probe (or without images, videos), an
            appearance or relevance layer no later layer can read, or attention supervision on a layer the
            model lacks.
    """
    media = settings.get("modalities", spec.modalities)
    read_outs = ReadOuts(appearance_layer=settings.get("appearance_layer", 1),
                         attention_layers=tuple(settings.get("attention_layers", (ATTEND_LAYER,))),
                         relevance_layers=tuple(settings.get("relevance_layers", (RELEVANCE_LAYER,))),
                         swap_class=settings.get("swap_marks", False),
                         lookalike_class=settings.get("lookalike_marks", False))
    layers = model.config.text_config.num_hidden_layers
    if settings["dense_weight"] > 0:
        if not on_grid:
            raise ValueError(f"the dense probe needs one image token per layout cell of the scenes ({IMAGE_SIZE} px "
                             f"images, {CELL} px cells: {IMAGE_SIZE // CELL} tokens per side) in a Llava or Qwen2-VL "
                             f"model; {spec.name} at this size has {tokens_per_side(shape)}: "
                             "use dense_weight=0 for this size")
        if settings["curriculum"] > 0 and model_kind(model) != "llava":
            raise ValueError("the background curriculum drops tokens of Llava models only: use curriculum=0")
        words = model.get_input_embeddings()
        for medium in spec.modalities:
            ramps = IMAGE_RAMPS if settings.get("position_ramp") and medium == "image" else None
            read_outs.probes[medium] = DenseProbe(
                words, class_word_ids(processor.tokenizer, _HEADS[medium]), _HEADS[medium],
                balanced=settings.get("balanced_probe", False), ramps=ramps).to(device_of(model))
        read_outs.yes_no = tuple(processor.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    if settings["attention_weight"] > 0 and max(read_outs.attention_layers) >= layers:
        raise ValueError(f"attention supervision reads layer(s) {list(read_outs.attention_layers)}; this language "
                         f"model has {layers} layer(s): use attention_weight=0 or layers below {layers}")
    if "relevance_layers" in settings and not read_outs.probes:
        raise ValueError("relevance_layers places the dense probe's relevance marks: use it with dense_weight > 0")
    # (the default, after layer 1, is not checked: a one-layer test model reads its marks after its only layer)
    if "relevance_layers" in settings and max(read_outs.relevance_layers) >= layers:
        raise ValueError(f"relevance_layers must be 1 to {layers - 1} (a later layer must read the marks), "
                         f"got {list(read_outs.relevance_layers)}")
    if settings.get("position_ramp") and not read_outs.probes:
        raise ValueError("the position ramp trains the dense probe's half read-outs: use it with dense_weight > 0")
    for key, name in _VIDEO_READ_OUTS:
        if settings.get(key) and (not read_outs.probes or "video" not in media):
            raise ValueError(f"the {name} read-out trains video tokens on the scenes' grid: use it with "
                             "dense_weight > 0 and video batches")
    if settings.get("time_weight"):
        read_outs.time = time_words(processor.tokenizer)
    if settings.get("motion_weight"):
        read_outs.motion = motion_words(processor.tokenizer)
    if settings.get("appearance_weight"):
        read_outs.appearance = appearance_words(processor.tokenizer)
        if not 1 <= read_outs.appearance_layer < layers:
            raise ValueError(f"appearance_layer must be 1 to {layers - 1} (a later layer must read it), "
                             f"got {read_outs.appearance_layer}")
    return read_outs
