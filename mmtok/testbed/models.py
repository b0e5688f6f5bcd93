"""Named testbed model specs: the stock Hugging Face model, its word-level tokenizer and its processor.

A testbed model is built from the real transformers classes (so the adapters, ``save_pretrained`` and
``mmtok.load`` treat it exactly like a downloaded checkpoint), sized for CPU training, with a closed
word-level vocabulary taken from :func:`mmtok.testbed.data.vocabulary`. Each name maps to a
:class:`TestbedSpec`; adding ``testbed-qwen2vl`` or ``testbed-audio`` means adding a builder and one entry
to :data:`SPECS`, while training (:mod:`mmtok.testbed.train`) and evaluation
(:mod:`mmtok.testbed.evaluate`) stay generic: they only need ``spec.build(size)``, ``spec.modalities``
and :func:`encode_items`.

Example::

    from mmtok.testbed.models import get_spec
    model, processor = get_spec("testbed-llava").build("full", seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmtok.testbed.data import vocabulary
from mmtok.testbed.data.items import QAItem

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_WORDS = ("USER", "ASSISTANT", ":")
# One user turn with the media first, then the question; the answer follows "ASSISTANT :".
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE = -100


@dataclass(frozen=True)
class Size:
    """The shape knobs of a testbed model (the same builder makes the shipped and the test-sized model).

    Attributes:
        image_size: pixels per side of the vision tower's input.
        patch_size: pixels per side of a patch; ``(image_size / patch_size) ** 2`` visual tokens per image.
        vision_hidden: vision tower width.
        vision_layers: vision tower depth.
        vision_heads: vision attention heads.
        text_hidden: language model width.
        text_layers: language model depth.
        text_heads: language model attention heads.
        text_kv_heads: key/value heads (grouped-query attention).
        mlp_ratio: MLP width / hidden width in both towers.
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

    @property
    def visual_tokens(self) -> int:
        """Tokens per image that reach the language model (CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2


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
    """

    name: str
    modalities: tuple[str, ...]
    architecture: str
    builder: Callable[[Size, int], tuple[Any, Any]]
    sizes: dict[str, Size]
    train_defaults: dict[str, Any] = field(default_factory=dict)

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


def word_tokenizer(words: Sequence[str], extra_specials: Sequence[str], **named: Any) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (split like :func:`mmtok.testbed.data.items.words`).

    Every word of the testbed vocabulary is one token, so a held-out answer is a short, exact token
    sequence; decoding joins words with single spaces, which is how the generator writes answers.

    Args:
        words: the vocabulary (e.g. :func:`mmtok.testbed.data.vocabulary` plus the chat words).
        extra_specials: special tokens after ``<unk> <s> </s> <pad>`` (e.g. ``"<image>"``).
        **named: passed to ``PreTrainedTokenizerFast`` (``extra_special_tokens`` ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIALS, *extra_specials]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(extra_specials), **named,
    )


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise in a fixed order from ``seed`` (independent of any global RNG use before)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


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
    _init_weights(model, seed)
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


SPECS: dict[str, TestbedSpec] = {
    "testbed-llava": TestbedSpec(
        name="testbed-llava",
        modalities=("image",),
        architecture="LlavaForConditionalGeneration (CLIP vision tower + Llama language model)",
        builder=build_llava,
        sizes={
            # 336 px / 21 px patches: 256 visual tokens, the floor, chosen for CPU training speed.
            "full": Size(patch_size=21, vision_hidden=96, vision_layers=2, vision_heads=2, text_hidden=128,
                         text_layers=3, text_heads=2, text_kv_heads=1),
            "tiny": Size(image_size=56, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                         text_layers=1, text_heads=2, text_kv_heads=1, mlp_ratio=2),
        },
        train_defaults={"steps": 800, "batch_size": 16, "lr": 1.5e-3, "warmup": 50, "weight_decay": 0.01},
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
    """The prompt text ``mmtok.compress_then_generate`` builds for ``item``: its chat template, media first."""
    content = [{"type": item.modality}, {"type": "text", "text": item.prompt}]
    messages = [{"role": "user", "content": content}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def _media_kwargs(item: QAItem) -> dict[str, Any]:
    if item.modality == "image":
        return {"images": [item.media]}
    if item.modality == "video":
        return {"videos": [item.media]}
    return {"audio": [item.media], "sampling_rate": item.sample_rate}


def encode_items(processor: Any, items: Sequence[QAItem]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: prompt in the chat template, answer, end of sequence.

    Each item goes through the processor alone (the same text and media path as generation); the answer
    words and ``</s>`` are appended, and ``labels`` are ``-100`` everywhere but on them. Per-token tensors
    (``[1, L]``: ids, mask, token types) are right-padded to the longest row; every other tensor (pixel
    values, grids) is concatenated along dim 0, which is how the stock models batch them.

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
        n_prompt = out["input_ids"].shape[1]
        row = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        row["input_ids"] = torch.cat([out["input_ids"], ans], 1)
        row["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(ans)], 1)
        row["labels"] = torch.cat([torch.full((1, n_prompt), IGNORE), ans], 1)
        for k, v in row.items():
            if k not in ("input_ids", "attention_mask", "labels") and v.dim() == 2 and v.shape[1] == n_prompt:
                row[k] = torch.cat([v, torch.zeros_like(ans, dtype=v.dtype)], 1)  # answer words are text (0)
        rows.append(row)
    length = max(r["input_ids"].shape[1] for r in rows)
    token_keys = {k for k, v in rows[0].items() if v.dim() == 2 and v.shape[1] == rows[0]["input_ids"].shape[1]}
    token_keys |= {"input_ids", "attention_mask", "labels"}
    fill = {"input_ids": tok.pad_token_id, "labels": IGNORE}
    batch: dict[str, torch.Tensor] = {}
    for k in rows[0]:
        if k in token_keys:
            batch[k] = torch.cat([torch.nn.functional.pad(r[k], (0, length - r[k].shape[1]), value=fill.get(k, 0))
                                  for r in rows], 0)
        else:
            batch[k] = torch.cat([r[k] for r in rows], 0)
    return batch
