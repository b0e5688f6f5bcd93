"""The benchmark models and media of ``mmtok bench e2e``, built in memory (nothing is downloaded).

- ``onevision-0.5b``: shaped like ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``: a SigLIP-so400m tower as
  OneVision ships it (hidden 1152, 26 layers: so400m's 27 minus the last, 16 heads, MLP 4304, 14 px
  patches, 384 px), a 2-layer GELU projector and a Qwen2-0.5B language model (hidden 896, 24 layers, 14
  heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings), ``anyres_max_9``, 384..2304 px pinpoints.
- ``qwen2.5-vl-3b``: shaped like ``Qwen/Qwen2.5-VL-3B-Instruct``: a 32-block windowed ViT (hidden 1280, MLP
  3420, 16 heads, full attention at blocks 7/15/23/31) and a 36-layer LM (hidden 2048, 16 heads, 2 KV heads,
  MLP 11008, vocabulary 151936, tied embeddings, M-RoPE 16/24/24). About 15 GB in fp32; it is built only
  where the machine has the memory (else a ``ValueError`` says how much is needed).

Weights are random (timing and memory depend on the shapes, not the values). The tokenizer is a small
byte-level BPE trained on the fly (the prompt is a few dozen tokens); the processors are
:class:`mmtok.api.ProcessorParts` (PIL image processors and the adapters' own frame pipelines), as
``mmtok.load`` gives on a machine without torchvision. ``tiny=True`` builds the same classes at toy sizes.

Media: ``assets/sample_coffee.jpg`` resized to 384x384, and 16 frames sampled uniformly from
``shared/data/videos/mmaction2_demo_arm_wrestling.mp4`` (Apache-2.0, see that folder's SOURCES.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

MODELS = ("onevision-0.5b", "qwen2.5-vl-3b")
ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "assets" / "sample_coffee.jpg"
VIDEO_NAME = "mmaction2_demo_arm_wrestling.mp4"
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
CORPUS = (
    "system user assistant you are a helpful assistant . describe this image in detail . describe what "
    "happens in this video in detail . the picture shows a red cup of coffee on a saucer with a spoon , "
    "two people arm wrestling at a table ."
)
QUESTIONS = {
    "image": "Describe this image in detail.",
    "video": "Describe what happens in this video in detail.",
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def video_path() -> Path:
    """The benchmark clip in ``shared/data/videos`` (beside the checkout, or ``/work/shared``)."""
    for base in (ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if (base / "videos" / VIDEO_NAME).is_file():
            return base / "videos" / VIDEO_NAME
    raise FileNotFoundError(f"the benchmark video {VIDEO_NAME} is not in ../shared/data/videos")


def make_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast``; the OneVision and Qwen placeholders are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _onevision(tok: Any, tiny: bool, vocab: int) -> tuple[Any, type, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from mmtok.api import ProcessorParts

    side = 56 if tiny else 384
    vision = SiglipVisionConfig(
        hidden_size=32 if tiny else 1152, intermediate_size=64 if tiny else 4304,
        num_hidden_layers=2 if tiny else 26, num_attention_heads=2 if tiny else 16, image_size=side,
        patch_size=14, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab, hidden_size=64 if tiny else 896, intermediate_size=128 if tiny else 4864,
        num_hidden_layers=4 if tiny else 24, num_attention_heads=4 if tiny else 14, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    pinpoints = [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    half = [0.5, 0.5, 0.5]
    images = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=pinpoints, image_mean=half, image_std=half
    )
    video = {
        "size": {"height": side, "width": side}, "image_mean": half, "image_std": half, "rescale_factor": 1 / 255,
    }
    return config, LlavaOnevisionForConditionalGeneration, ProcessorParts(tok, images, None, video)


def _qwen25(tok: Any, tiny: bool, vocab: int) -> tuple[Any, type, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmtok.adapters.qwen2_vl import VIDEO_DEFAULTS
    from mmtok.api import ProcessorParts

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    vision = dict(
        depth=2 if tiny else 32, hidden_size=32 if tiny else 1280, intermediate_size=64 if tiny else 3420,
        num_heads=2 if tiny else 16, out_hidden_size=64 if tiny else 2048, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56 if tiny else 112,
        fullatt_block_indexes=[1] if tiny else [7, 15, 23, 31], tokens_per_second=2,
    )
    text = dict(
        vocab_size=vocab, hidden_size=64 if tiny else 2048, intermediate_size=128 if tiny else 11008,
        num_hidden_layers=4 if tiny else 36, num_attention_heads=4 if tiny else 16, num_key_value_heads=2,
        max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3] if tiny else [16, 24, 24],
                         "rope_theta": 1e6},
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
    )
    small = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    images = Qwen2VLImageProcessorPil(
        size=small if tiny else {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    video = {**VIDEO_DEFAULTS, **({"size": small} if tiny else {})}
    return config, Qwen2_5_VLForConditionalGeneration, ProcessorParts(tok, images, None, video)


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build(name: str, *, tiny: bool = False, vocab: int | None = None, seed: int = 0) -> tuple[Any, Any, dict]:
    """The random-weight model, its processor, and a description for the report.

    Args:
        name: one of :data:`MODELS`.
        tiny: the same classes and code path at toy sizes (for tests).
        vocab: the language model's vocabulary (default: the real 151936; the tokenizer's own size when tiny).
        seed: for the random weights.

    Raises:
        ValueError: an unknown model, a vocabulary smaller than the tokenizer's, or a model that needs
            more memory than the machine has available (checked before any weight is allocated).
    """
    if name not in MODELS:
        raise ValueError(f"unknown e2e model {name!r}; choose from {', '.join(MODELS)}")
    tok = make_tokenizer()
    vocab = vocab or (len(tok) if tiny else 151936)
    if vocab < len(tok):
        raise ValueError(f"vocab must be at least the tokenizer's {len(tok)} tokens, got {vocab}")
    config, cls, processor = (_onevision if name == "onevision-0.5b" else _qwen25)(tok, tiny, vocab)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        params = sum(p.numel() for p in cls(config).parameters())
    need, free = params * 4 + 2 * 2**30, available_memory()
    if free is not None and need > free:
        raise ValueError(
            f"{name} needs about {need / 2**30:.1f} GiB in fp32 (weights + 2 GiB of activations) but "
            f"{free / 2**30:.1f} GiB are available; free memory, or pass a smaller --vocab"
        )
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = cls(config).eval()
    built = time.perf_counter() - start
    model.generation_config.eos_token_id = None  # every run decodes the same number of tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    info = {"name": name, "tiny": tiny, "parameters": int(params), "vocab": vocab, "dtype": "float32",
            "attn_implementation": "sdpa", "build_s": built}
    return model, processor, info


def load_media(tiny: bool = False, frames: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image (384x384, or 56x56 when tiny) and the video's sampled frames (16, or 4 when tiny).

    Returns:
        ``({"image": PIL.Image, "video": Video}, a description of each for the report)``.
    """
    from PIL import Image

    from mmtok.adapters.media import load_video

    side = 56 if tiny else 384
    with Image.open(IMAGE) as im:
        image = im.convert("RGB").resize((side, side), Image.BICUBIC)
    path = video_path()
    video = load_video(path, frames or (4 if tiny else 16))
    info = {
        "image": {"source": f"assets/{IMAGE.name}", "size": [side, side]},
        "video": {"source": f"shared/data/videos/{path.name}", "frames": video.num_frames,
                  "frame_size": list(video.frames.shape[1:3]), "sampled_fps": round(video.fps, 3)},
    }
    return {"image": image, "video": video}, info


def prompt(medium: str) -> str:
    """A Qwen chat-format prompt with the generic ``<image>`` / ``<video>`` marker (adapters translate it)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<{medium}>\n{QUESTIONS[medium]}<|im_end|>\n<|im_start|>assistant\n"
    )
