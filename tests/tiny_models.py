"""Tiny random LLaVA-1.5, Qwen2-VL and Qwen2.5-VL checkpoints with their real processors, built offline.

Each builder makes the stock ``*ForConditionalGeneration`` from its real config classes (shrunk: a 2-layer
vision tower of 14x14 patches, a 2-layer language model), a byte-level BPE tokenizer trained on the fly
with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast`` with the model's special tokens and a chat
template, and the real PIL-backend image processor; it saves everything with ``save_pretrained`` so tests
load it back through ``mmtok.load`` (the real path).

Qwen: the stock ``Qwen2VLProcessor`` also holds a video processor, and transformers' video processors need
torchvision, which is not installed here; the directory therefore holds the tokenizer, the image processor,
a ``video_preprocessor_config.json`` (small frame sizes) and the chat template, and ``mmtok.load`` falls
back to :class:`mmtok.api.ProcessorParts` exactly as it would for a real Qwen checkpoint on this machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data") if not (ROOT.parent / "shared" / "data").is_dir() else ROOT.parent / "shared" / "data"
IMAGES = DATA / "images"
VIDEOS = DATA / "videos"
COFFEE = ROOT / "assets" / "sample_coffee.jpg"

CORPUS = [
    "a photo of a cat on a red couch with two remotes",
    "what is in the image ? describe the picture in one sentence .",
    "an astronaut holds a helmet in front of a flag",
    "espresso in a red cup on a saucer with a spoon",
    "two people arm wrestling at a table in a video",
    "USER : ASSISTANT : user assistant system",
]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen frames and images: at most 112x112 pixels -> at most 8x8 patches -> at most 16 LLM tokens per frame.
QWEN_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}


def make_tokenizer(specials: list[str], **named: Any) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (vocab 320) with ``specials`` as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def seed_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every weight from a seeded normal (std 0.2) so that greedy tokens are clear-cut, not ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "norm" in name or name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def build_llava(path: Path, seed: int = 0, attn: str = "sdpa") -> Path:
    """Save a tiny ``LlavaForConditionalGeneration`` (CLIP tower with CLS, ``vision_feature_layer=-2``,
    ``"default"`` strategy: 16 image tokens from a 56x56 image) and its ``LlavaProcessor`` to ``path``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = make_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
        patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = seed_weights(LlavaForConditionalGeneration(config), seed)
    images = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_qwen(path: Path, version: str = "2", seed: int = 0, attn: str = "sdpa") -> Path:
    """Save a tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``: windowed blocks 0, full block 1,
    ``tokens_per_second=2``) with its tokenizer, image processor, video settings and chat template.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    special = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        processor_class = "Qwen2VLProcessor"
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=2,
        )
        processor_class = "Qwen2_5_VLProcessor"
    config = Config(vision_config=vision, text_config=text, **special)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = seed_weights(Model(config), seed)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(size=dict(QWEN_SIZE)).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor", "size": dict(QWEN_SIZE), "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255,
    }
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return path


def manual_greedy(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, steps: int,
    eos: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy decoding with plain ``forward`` calls: the reference for hand-pruned inputs.

    Args:
        model: the stock ``*ForConditionalGeneration``.
        inputs_embeds: ``[B, L, D]`` prompt embeddings (features already in their placeholder slots).
        attention_mask: ``[B, L]`` (left padding).
        position_ids: ``[B, L]`` or ``[P, B, L]`` (Qwen: the 4-row text + M-RoPE ids); each step after the
            prompt continues every row from its last id + 1.
        steps: tokens to generate.
        eos: stop a row (feeding pad) once it produced ``eos``.

    Returns:
        ``(per-step logits [B, V], tokens [B, steps])``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    logits, tokens = [], []
    embeds, mask, pos = inputs_embeds, attention_mask, position_ids
    done = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            step = out.logits[:, -1].float()
            nxt = step.argmax(-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, model.generation_config.pad_token_id or 0), nxt)
                done |= nxt == eos
            logits.append(step)
            tokens.append(nxt)
            embeds = model.get_input_embeddings()(nxt[:, None])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[..., -1:] + 1
    return logits, torch.stack(tokens, 1)


def hooks_left(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook registered anywhere in ``model``, as ``(module, kind, handle id)``."""
    out = set()
    for name, m in model.named_modules():
        out |= {(name, "pre", k) for k in m._forward_pre_hooks} | {(name, "post", k) for k in m._forward_hooks}
    return out


def greedy_kwargs(steps: int = 4) -> dict[str, Any]:
    """``generate()`` kwargs for a comparable greedy run that returns per-step logits."""
    return dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def llava(llava_dir: Path) -> tuple[Any, Any]:
    import mmtok

    return mmtok.load(llava_dir, attn_implementation="sdpa")


@pytest.fixture(scope="session", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen(tmp_path_factory.mktemp(f"tiny-qwen{request.param}"), version=request.param)


@pytest.fixture(scope="session")
def qwen(qwen_dir: Path) -> tuple[Any, Any]:
    import mmtok

    return mmtok.load(qwen_dir, attn_implementation="sdpa")


def assert_same_run(result: Any, reference_logits: torch.Tensor, reference_tokens: torch.Tensor) -> None:
    """A Result's per-step logits and greedy tokens equal a reference run's."""
    steps = len(result.output.logits)
    assert steps >= 1
    for t in range(steps):
        torch.testing.assert_close(result.output.logits[t].float(), reference_logits[t].float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(result.sequences, reference_tokens[:, :steps])
