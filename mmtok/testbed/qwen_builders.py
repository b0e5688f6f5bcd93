"""The Qwen testbed builders: ``testbed-qwen2vl`` (images and videos, M-RoPE) and ``testbed-audio`` (Qwen2-Audio).

Each builder returns the stock transformers model, freshly initialised from a seed, and its processor with
a word-level tokenizer; :data:`mmtok.testbed.models.SPECS` names them. The Qwen2-VL processor runs videos
through mmtok's own frame pipeline (no torchvision here) and saves as the stock ``Qwen2VLProcessor``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmtok.testbed.builder_parts import CHAT_WORDS, CLIP_MEAN, CLIP_STD, init_weights, word_tokenizer
from mmtok.testbed.data import vocabulary
from mmtok.testbed.data.audio import AUDIO_SECONDS, SAMPLE_RATE

if TYPE_CHECKING:
    from mmtok.testbed.models import Size

# The same turn for Qwen2-VL's placeholders (``<|vision_start|><|image_pad|><|vision_end|>``, the marker the
# mmtok adapter and the stock processor expand) and for Qwen2-Audio's (``<|audio_bos|><|AUDIO|><|audio_eos|>``).
# The question comes first, as in LLAVA_TEMPLATE: causal attention then lets every media token read it, which
# the dense relevance supervision of training relies on (mmtok.testbed.dense.relevance_loss).
QWEN2VL_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>\n"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>\n{% endif %}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
AUDIO_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>\n{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN2VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
AUDIO_SPECIALS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")


@functools.cache
def _qwen2vl_processor_classes() -> tuple[type, type]:
    """``(FramesVideoProcessor, Qwen2VLFramesProcessor)``, defined on first use (transformers imports lazily).

    transformers' video processors need torchvision, which CPU-only machines here lack, and the stock
    ``Qwen2VLProcessor`` refuses any other video processor there. These two keep the stock processor's
    ``__call__`` (placeholder expansion, ``mm_token_type_ids``) and run videos through mmtok's own frame
    pipeline (:func:`mmtok.adapters.qwen2_vl.video_patches`, the Qwen2-VL video processor's steps on PIL /
    numpy), the same code the adapter uses for a processor loaded without torchvision. They save as the
    stock ``Qwen2VLProcessor`` / ``Qwen2VLVideoProcessor``, so the directory loads like a real checkpoint.
    """
    import numpy as np
    from transformers import BatchFeature, Qwen2VLProcessor
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.video_utils import make_batched_videos

    from mmtok.adapters.qwen2_vl import video_patches

    class FramesVideoProcessor(VideoProcessorMixin):
        """Qwen2-VL's video processor settings, applied by :func:`mmtok.adapters.qwen2_vl.video_patches`."""

        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def preprocess(self, videos: Any, return_tensors: Any = None, **_: Any) -> Any:
            """Videos (PIL frame lists or ``[T, H, W, 3]`` arrays) -> ``pixel_values_videos``, ``video_grid_thw``."""
            frames = [np.asarray(v, dtype=np.uint8) for v in make_batched_videos(videos)]
            patches, grids = zip(*(video_patches(f, self.to_dict()) for f in frames), strict=True)
            return BatchFeature({"pixel_values_videos": np.concatenate(patches),
                                 "video_grid_thw": np.asarray(grids, dtype=np.int64)}, tensor_type=return_tensors)

        def to_dict(self) -> dict[str, Any]:
            """The settings, under the stock class name (what a machine with torchvision loads)."""
            return {**super().to_dict(), "video_processor_type": "Qwen2VLVideoProcessor"}

    class Qwen2VLFramesProcessor(Qwen2VLProcessor):
        """The stock ``Qwen2VLProcessor`` holding a :class:`FramesVideoProcessor`."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and isinstance(argument, FramesVideoProcessor):
                return FramesVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

        def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
            """The stock files, plus ``video_preprocessor_config.json`` (read where the video class cannot load)."""
            files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
            out = Path(save_directory)
            self.video_processor.to_json_file(out / "video_preprocessor_config.json")
            tok_cfg = out / "tokenizer_config.json"
            cfg = json.loads(tok_cfg.read_text())
            cfg["processor_class"] = "Qwen2VLProcessor"
            tok_cfg.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
            return [*files, str(out / "video_preprocessor_config.json")]

    return FramesVideoProcessor, Qwen2VLFramesProcessor


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension over ``(t, h, w)``: 16 / 24 / 24 of 64, scaled."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def build_qwen2vl(size: Size, seed: int = 0) -> tuple[Any, Any]:
    """``Qwen2VLForConditionalGeneration`` (ViT with 3-D patches, 2x2 PatchMerger, M-RoPE Qwen2 LM) and its processor.

    Images are resized to ``image_size`` px square (``min_pixels = max_pixels``), cut into ``patch_size`` px
    patches of ``temporal_patch_size`` copies, and merged 2x2: ``(image_size / patch / 2) ** 2`` tokens
    (256 at 448 px). Video frames are resized to ``video_size`` px: 16 frames at 336 px give 8 x 12 x 12 =
    1,152 tokens, each with its own ``(t, h, w)`` M-RoPE position.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frames_video, frames_processor = _qwen2vl_processor_classes()
    tok = word_tokenizer(
        [*CHAT_WORDS, *vocabulary("image"), *vocabulary("video")], QWEN2VL_SPECIALS,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(
        depth=size.vision_layers, embed_dim=size.vision_hidden, hidden_size=size.text_hidden,
        num_heads=size.vision_heads, mlp_ratio=size.mlp_ratio, patch_size=size.patch_size,
        spatial_merge_size=size.merge_size, temporal_patch_size=size.temporal_patch_size,
    )
    text = dict(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_hidden * size.mlp_ratio,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=2048, **special,
        # Llama's epsilon (testbed-llava's), so a language model started from it computes the same
        # (mmtok.testbed.transfer); Qwen2's default is 1e-5.
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(size.text_hidden // size.text_heads)},
    )
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True, **special,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    init_weights(model, seed)
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    common = dict(patch_size=size.patch_size, temporal_patch_size=size.temporal_patch_size,
                  merge_size=size.merge_size, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": size.image_size**2, "longest_edge": size.image_size**2}, **common)
    videos = frames_video(
        size={"shortest_edge": size.video_size**2, "longest_edge": size.video_size**2}, rescale_factor=1 / 255,
        do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, do_sample_frames=False,
        resample=3, **common)
    processor = frames_processor(image_processor=images, tokenizer=tok, video_processor=videos,
                                 chat_template=QWEN2VL_TEMPLATE)
    return model.train(), processor


def build_audio(size: Size, seed: int = 0) -> tuple[Any, Any]:
    """``Qwen2AudioForConditionalGeneration`` (Whisper-style encoder on 128 mel bins + Qwen2 LM) and its processor.

    The processor's ``WhisperFeatureExtractor`` takes :data:`~mmtok.testbed.data.audio.SAMPLE_RATE` audio
    (16 kHz, Whisper's rate) in windows of the clips' length (3 s: 300 mel frames, not Whisper's 30 s); the
    encoder's two convolutions (the second of stride 2) and its 2x average pool leave 25 tokens per second,
    75 per clip. The ``vision_*`` knobs of ``size`` size the encoder; its positions are Whisper's sinusoids.
    """
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )
    from transformers.models.whisper.modeling_whisper import sinusoids

    tok = word_tokenizer(
        [*CHAT_WORDS, *vocabulary("audio")], AUDIO_SPECIALS,
        extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                              "audio_eos_token": "<|audio_eos|>"},
    )
    seconds = int(round(AUDIO_SECONDS))
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=seconds,
                                       hop_length=160, n_fft=400)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    encoder = Qwen2AudioEncoderConfig(
        num_mel_bins=128, encoder_layers=size.vision_layers, encoder_attention_heads=size.vision_heads,
        encoder_ffn_dim=size.vision_hidden * size.mlp_ratio, d_model=size.vision_hidden,
        max_source_positions=features.nb_max_frames // 2,
    )
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_hidden * size.mlp_ratio,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=1024, **special,
    )
    config = Qwen2AudioConfig(audio_config=encoder, text_config=text,
                              audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"), **special)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    init_weights(model, seed)
    positions = model.model.audio_tower.embed_positions.weight
    with torch.no_grad():
        positions.copy_(sinusoids(*positions.shape))
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tok, chat_template=AUDIO_TEMPLATE)
    return model.train(), processor
