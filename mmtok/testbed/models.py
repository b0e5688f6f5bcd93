"""Named testbed model specs: the stock Hugging Face model, its word-level tokenizer and its processor.

A testbed model is built from the real transformers classes (so the adapters, ``save_pretrained`` and
``mmtok.load`` treat it exactly like a downloaded checkpoint), sized for CPU training, with a closed
word-level vocabulary taken from :func:`mmtok.testbed.data.vocabulary`. Each name maps to a
:class:`TestbedSpec` (``testbed-llava``: images; ``testbed-qwen2vl``: images and videos, M-RoPE;
``testbed-audio``: Qwen2-Audio, a Whisper-style encoder on 128 mel bins); a new model is a builder and one
entry in :data:`SPECS`, while training (:mod:`mmtok.testbed.train`) and evaluation
(:mod:`mmtok.testbed.evaluate`) stay generic: they only need ``spec.build(size)``, ``spec.modalities``
and :func:`encode_items`.

The Qwen2-VL and Qwen2-Audio builders live in :mod:`mmtok.testbed.qwen_builders` and the pieces every
builder shares in :mod:`mmtok.testbed.builder_parts`; their public names are re-exported here.

Example::

    from mmtok.testbed.models import get_spec
    model, processor = get_spec("testbed-llava").build("full", seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmtok.testbed.builder_parts import (  # noqa: F401  (re-exported from here)
    CHAT_WORDS,
    CLIP_MEAN,
    CLIP_STD,
    SPECIALS,
    init_weights,
    word_tokenizer,
)
from mmtok.testbed.data import item as make_item
from mmtok.testbed.data import vocabulary
from mmtok.testbed.data.items import QAItem
from mmtok.testbed.qwen_builders import (  # noqa: F401  (re-exported from here)
    AUDIO_SPECIALS,
    AUDIO_TEMPLATE,
    QWEN2VL_SPECIALS,
    QWEN2VL_TEMPLATE,
    build_audio,
    build_qwen2vl,
)

# One user turn: the question, then the image (whatever order the message lists them in); the answer follows
# "ASSISTANT :". Question first lets every visual token attend to the question in the first layer (the
# causal mask hides it otherwise), which a language model trained from scratch on CPU needs to learn to read
# its image at all: two image-first runs stayed at chance (issue #4 notes).
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IGNORE = -100
# Processor outputs with one entry per token (``[1, L]``): extended over the answer, then right-padded. Every
# other tensor a processor returns is a media tensor (pixels, grids, audio features), whatever its shape.
TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", *TYPE_KEYS)


@dataclass(frozen=True)
class Size:
    """The shape knobs of a testbed model (the same builder makes the shipped and the test-sized model).

    Attributes:
        image_size: pixels per side of the vision tower's input.
        patch_size: pixels per side of a patch; ``(image_size / patch_size / merge_size) ** 2`` tokens per image.
        vision_hidden: vision tower width.
        vision_layers: vision tower depth.
        vision_heads: vision attention heads.
        text_hidden: language model width.
        text_layers: language model depth.
        text_heads: language model attention heads.
        text_kv_heads: key/value heads (grouped-query attention).
        mlp_ratio: MLP width / hidden width in both towers.
        merge_size: patches per side merged into one LLM token (Qwen2-VL's PatchMerger: 2; LLaVA: 1).
        video_size: pixels per side of a video frame at the tower's input (Qwen2-VL).
        temporal_patch_size: frames per patch (Qwen2-VL: 2; an image is its own frame twice).

    For ``testbed-audio`` the ``vision_*`` knobs size the audio encoder (width, layers, heads).
    """

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mlp_ratio: int = 3
    merge_size: int = 1
    video_size: int = 224
    temporal_patch_size: int = 2

    @property
    def visual_tokens(self) -> int:
        """Tokens per image that reach the language model (CLS dropped; after the patch merger)."""
        return (self.image_size // self.patch_size // self.merge_size) ** 2

    def video_tokens(self, frames: int) -> int:
        """Tokens per video of ``frames`` frames that reach the language model (Qwen2-VL)."""
        t = -(-frames // self.temporal_patch_size)
        return t * (self.video_size // self.patch_size // self.merge_size) ** 2


@dataclass(frozen=True)
class TestbedSpec:
    """One named testbed model.

    Attributes:
        name: ``"testbed-<name>"``, the directory under ``assets/`` and the name ``mmtok.load`` takes.
        modalities: the media its items come in (``"image"``, ``"video"``, ``"audio"``).
        architecture: the transformers class, for the model card.
        builder: ``(size, seed) -> (model, processor)``, a freshly initialised model in train mode.
        sizes: named sizes; ``"full"`` is the shipped one, ``"tiny"`` the one tests train.
        train_defaults: default ``steps``, ``batch_size``, ``lr``, ``warmup`` ... of ``mmtok testbed train``.
        stage_recipe: warm-started stages that may follow a run (``mmtok testbed train --stages N`` runs the
            first ``N``; :mod:`mmtok.testbed.stages`), each a dict of ``train()`` keyword arguments.
    """

    name: str
    modalities: tuple[str, ...]
    architecture: str
    builder: Callable[[Size, int], tuple[Any, Any]]
    sizes: dict[str, Size]
    train_defaults: dict[str, Any] = field(default_factory=dict)
    stage_recipe: tuple[dict[str, Any], ...] = ()

    def build(self, size: str | Size = "full", seed: int = 0) -> tuple[Any, Any]:
        """A freshly initialised ``(model, processor)``; the same ``seed`` gives the same weights.

        Raises:
            ValueError: an unknown size name.
        """
        if isinstance(size, str):
            if size not in self.sizes:
                raise ValueError(f"unknown size {size!r} for {self.name}; expected one of {sorted(self.sizes)}")
            size = self.sizes[size]
        return self.builder(size, seed)

    def describe(self, model: Any, processor: Any) -> list[str]:
        """Model-card lines: the encoder, the language model, and the LLM tokens one item of each modality gives."""
        cfg = model.config
        enc = getattr(cfg, "vision_config", None) or cfg.audio_config
        text = cfg.text_config
        tokens = ", ".join(f"{media_tokens(model, processor, m)} per {m}" for m in self.modalities)
        return [
            f"- encoder: {enc.model_type}, {enc.num_hidden_layers} layers, width "
            f"{getattr(enc, 'embed_dim', None) or enc.hidden_size}, {enc.num_attention_heads} heads; LLM tokens "
            f"per generated item: {tokens}",
            f"- language model: {text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
            f"{text.num_attention_heads} heads ({text.num_key_value_heads} key/value), vocabulary {text.vocab_size} "
            "words (word-level tokenizer)",
        ]


def build_llava(size: Size, seed: int = 0) -> tuple[Any, Any]:
    """``LlavaForConditionalGeneration`` (CLIP vision tower + Llama LM) and its ``LlavaProcessor``.

    The tower keeps its CLS token (so CLS-attention methods have their signal); the model takes the last
    vision layer (``vision_feature_layer=-1``) under the ``"default"`` strategy, which drops CLS:
    ``(image_size / patch_size) ** 2`` tokens per image (576 at 336 px / 14 px).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = word_tokenizer([*CHAT_WORDS, *vocabulary("image")], ["<image>"],
                         extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_hidden * size.mlp_ratio,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads, image_size=size.image_size,
        patch_size=size.patch_size, projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_hidden * size.mlp_ratio,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=size.visual_tokens,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    init_weights(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    images = LlavaImageProcessorPil(
        size={"shortest_edge": size.image_size}, crop_size={"height": size.image_size, "width": size.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=size.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )
    return model.train(), processor


LLAVA_STAGE: dict[str, Any] = {
    "steps": 900, "lr": 4e-4, "warmup": 20, "position_ramp": True, "attention_layers": (1, 2),
    "family_mix": {"count": 2, "position": 3, "relation": 3}, "relation_every_word": True}
"""One stage of ``testbed-llava``'s stage recipe (``train()`` keyword arguments)."""

SPECS: dict[str, TestbedSpec] = {
    "testbed-llava": TestbedSpec(
        name="testbed-llava",
        modalities=("image",),
        architecture="LlavaForConditionalGeneration (CLIP vision tower + Llama language model)",
        builder=build_llava,
        sizes={
            # 336 px / 21 px patches: 256 visual tokens, the floor, chosen for CPU training speed.
            "full": Size(patch_size=21, vision_hidden=96, vision_layers=2, vision_heads=2, text_hidden=128,
                         text_layers=3, text_heads=4, text_kv_heads=2),
            "tiny": Size(image_size=56, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                         text_layers=1, text_heads=2, text_kv_heads=1, mlp_ratio=2),
        },
        # The from-scratch recipe (docs/testbed.md, Status: 82.8 % in two hours on a 2-core CPU): dense probe,
        # relevance marks and attention supervision on layers 1 and 2 (mmtok.testbed.dense), the 2-D position
        # code a CLIP tower starts from and its ramp (mmtok.testbed.position_code, dense.position_ramp), twice
        # the count, read and relation items (mmtok.testbed.family_mix); no easy-first curriculum (a run with
        # it had 73.4 % at 88 minutes).
        train_defaults={"steps": 6600, "batch_size": 32, "lr": 2e-3, "warmup": 100, "weight_decay": 0.01,
                        "dense_weight": 1.0, "curriculum": 0.0, "attention_weight": 1.0, "position_code": 3.0,
                        "position_ramp": True, "attention_layers": (1, 2),
                        "family_mix": {"count": 2, "read": 2, "relation": 2}},
        # Three stages after that run brought it from 83.6 to 90.9 % (200 held-out items per family; Status):
        # a fifth of the rate with a fresh warm-up, more count, position and relation items, and both words
        # of a relation answer attending to the object that answers.
        stage_recipe=(LLAVA_STAGE,) * 3,
    ),
    "testbed-qwen2vl": TestbedSpec(
        name="testbed-qwen2vl",
        modalities=("image", "video"),
        architecture="Qwen2VLForConditionalGeneration (ViT + 2x2 patch merger, Qwen2 language model with M-RoPE)",
        builder=build_qwen2vl,
        sizes={
            # 448 px images: 32 x 32 patches -> 256 tokens; 16 frames at 336 px: 8 x 12 x 12 = 1,152 tokens.
            # The language model has testbed-llava's shape, so it can start from it (mmtok.testbed.transfer).
            "full": Size(image_size=448, video_size=336, patch_size=14, merge_size=2, vision_hidden=96,
                         vision_layers=2, vision_heads=2, text_hidden=128, text_layers=3, text_heads=4,
                         text_kv_heads=2),
            "tiny": Size(image_size=56, video_size=56, patch_size=14, merge_size=2, vision_hidden=32,
                         vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
                         text_kv_heads=1, mlp_ratio=2),
        },
        # Dense probe, relevance and attention supervision on the image rows (16 x 16 merged tokens = the
        # layout grid, mmtok.testbed.media_grid); no curriculum (it rebuilds 1-D positions only).
        train_defaults={"steps": 800, "batch_size": 8, "lr": 1.5e-3, "warmup": 50, "weight_decay": 0.01,
                        "dense_weight": 1.0, "curriculum": 0.0, "attention_weight": 1.0},
    ),
    "testbed-audio": TestbedSpec(
        name="testbed-audio",
        modalities=("audio",),
        architecture="Qwen2AudioForConditionalGeneration (Whisper-style audio encoder + Qwen2 language model)",
        builder=build_audio,
        sizes={
            # 3 s clips: 300 mel frames -> 75 audio tokens.
            "full": Size(vision_hidden=128, vision_layers=2, vision_heads=2, text_hidden=128, text_layers=3,
                         text_heads=2, text_kv_heads=1),
            "tiny": Size(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1,
                         text_heads=2, text_kv_heads=1, mlp_ratio=2),
        },
        # Dense event-kind probe, relevance and attention supervision on the 40 ms tokens (dense_audio).
        train_defaults={"steps": 800, "batch_size": 16, "lr": 1.5e-3, "warmup": 50, "weight_decay": 0.01,
                        "dense_weight": 1.0, "curriculum": 0.0, "attention_weight": 1.0},
    ),
}


def get_spec(name: str) -> TestbedSpec:
    """The spec of a testbed name.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in SPECS:
        raise ValueError(f"unknown testbed model {name!r}; expected one of {sorted(SPECS)}")
    return SPECS[name]


def chat_prompt(processor: Any, item: QAItem) -> str:
    """The prompt text ``mmtok.compress_then_generate`` builds for ``item``: the model's own chat template."""
    content = [{"type": item.modality}, {"type": "text", "text": item.prompt}]
    messages = [{"role": "user", "content": content}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def media_tokens(model: Any, processor: Any, modality: str) -> int:
    """LLM placeholder tokens of a generated ``modality`` item (every item of a modality has the same size)."""
    ids = encode_items(processor, [make_item(modality, "train", 0)])["input_ids"]
    return int((ids == getattr(model.config, f"{modality}_token_id")).sum())


def _media_kwargs(item: QAItem) -> dict[str, Any]:
    if item.modality == "image":
        return {"images": [item.media]}
    if item.modality == "video":
        return {"videos": [item.media]}
    return {"audio": [item.media], "sampling_rate": item.sample_rate}


def encode_items(processor: Any, items: Sequence[QAItem]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: prompt in the chat template, answer, end of sequence.

    Each item goes through the processor alone (the same text and media path as generation); the answer
    words and ``</s>`` are appended, and ``labels`` are ``-100`` everywhere but on them. The per-token
    tensors (:data:`TOKEN_KEYS`: ids, mask, labels, token types) are right-padded to the longest row;
    every other tensor (pixel values, grids, audio features) is concatenated along dim 0 over the items
    that have it, in item order, which is how the stock models batch them (a batch may mix images and
    videos: each model fills its placeholders in row order from its own media tensors).

    Returns:
        ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]``, ``labels`` ``[B, L]`` and the media tensors.

    Raises:
        ValueError: an empty batch.
    """
    if not items:
        raise ValueError("encode_items needs at least one item")
    tok = processor.tokenizer
    rows: list[dict[str, torch.Tensor]] = []
    for it in items:
        out = processor(text=[chat_prompt(processor, it)], return_tensors="pt", **_media_kwargs(it))
        answer = tok(it.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ans = torch.tensor([answer], dtype=torch.long)
        row = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        row["labels"] = torch.cat([torch.full_like(out["input_ids"], IGNORE), ans], 1)
        row["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(ans)], 1)
        row["input_ids"] = torch.cat([out["input_ids"], ans], 1)
        for k in TYPE_KEYS:
            if k in row:  # answer words are text (type 0)
                row[k] = torch.cat([row[k], torch.zeros_like(ans, dtype=row[k].dtype)], 1)
        rows.append(row)
    length = max(r["input_ids"].shape[1] for r in rows)
    fill = {"input_ids": tok.pad_token_id, "labels": IGNORE}
    batch: dict[str, torch.Tensor] = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        if k in TOKEN_KEYS:
            batch[k] = torch.cat([torch.nn.functional.pad(r[k], (0, length - r[k].shape[1]), value=fill.get(k, 0))
                                  for r in rows], 0)
        else:
            batch[k] = torch.cat([r[k] for r in rows if k in r], 0)
    return batch
