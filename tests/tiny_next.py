"""Tiny random LLaVA-NeXT and LLaVA-OneVision models with their real processors, built offline.

The configs follow the real checkpoints' layouts, shrunk: ``llava-hf/llava-v1.6-mistral-7b-hf`` (CLIP tower
with a CLS token, ``vision_feature_layer=-2``, ``"default"`` strategy, a Mistral LM, the 1:2 / 2:1 / 2:2 /
3:1 / 1:3 AnyRes pinpoints) and ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` (SigLIP tower without CLS,
``vision_feature_layer=-1``, ``"full"`` strategy, a Qwen2 LM, ``anyres_max_9`` with pinpoints up to 4x4
crops so that the model's own feature interpolation is exercised). The vision towers take 56x56 crops of
14x14 patches: 16 tokens per crop, 4 per video frame after OneVision's 2x pooling.

The tokenizer is a word-level vocabulary trained on the fly with ``tokenizers`` and wrapped in
``PreTrainedTokenizerFast``. Images go through the real PIL-backend image processors.

Videos: transformers' video processors need torchvision, which is not installed here (they raise
``ImportError``). :class:`FrameVideoProcessor` stands in for ``LlavaOnevisionVideoProcessor``: it is a
``VideoProcessorMixin`` (so the real ``LlavaOnevisionProcessor`` accepts it and expands ``<video>`` itself
through its own ``replace_video_token``) that resizes every frame to the tower's square size with PIL
(bicubic), rescales by 1/255 and normalises with the OneVision mean / std, which is what the real video
processor does for frames that need no cropping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiny_models import seed_weights
from transformers.video_processing_utils import VideoProcessorMixin

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
IMAGES = DATA / "images"
VIDEOS = DATA / "videos"

CROP = 56
PATCH = 14
WORDS = (
    "what is in the image video describe this picture a an of and on with cat dog hat rocket man woman "
    "red blue green there are two one three people playing ball answer question user assistant please "
    "frame scene shows left right top bottom small large"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]


def make_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` with ``<image>`` / ``<video>`` as single special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(WORDS)] * 2, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    fast.padding_side = "left"
    return fast


def _vision(kind: str) -> Any:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=CROP,
        patch_size=PATCH,
    )
    return CLIPVisionConfig(projection_dim=32, **common) if kind == "clip" else SiglipVisionConfig(**common)


def tiny_llava_next(seed: int = 0, attn: str = "sdpa") -> tuple[Any, Any]:
    """``(LlavaNextForConditionalGeneration, LlavaNextProcessor)``, random weights, fp32, CPU."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = make_tokenizer()
    pinpoints = [[CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP], [3 * CROP, CROP], [CROP, 3 * CROP]]
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = LlavaNextConfig(
        vision_config=_vision("clip"), text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(CROP // PATCH) ** 2,
    )
    config._attn_implementation = attn
    model = seed_weights(LlavaNextForConditionalGeneration(config), seed)
    model.generation_config.eos_token_id = None  # decode every requested step
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def tiny_llava_onevision(seed: int = 0, attn: str = "sdpa") -> tuple[Any, Any]:
    """``(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor)``, random weights, fp32, CPU."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = make_tokenizer()
    pinpoints = [[CROP * i, CROP * j] for i in range(1, 5) for j in range(1, 5)]
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=_vision("siglip"), text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    config._attn_implementation = attn
    model = seed_weights(LlavaOnevisionForConditionalGeneration(config), seed)
    model.generation_config.eos_token_id = None  # decode every requested step
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    images = LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std
    )
    processor = _frame_processor_class(LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=tok, video_processor=FrameVideoProcessor(size=CROP, mean=mean, std=std),
        num_image_tokens=(CROP // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return model, processor


def _frame_processor_class(cls: type) -> type:
    """``cls`` accepting a :class:`FrameVideoProcessor`: transformers looks the video processor's base class
    up in an auto-mapping that is a placeholder when torchvision is missing, so its class check fails."""

    class WithFrameVideoProcessor(cls):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and isinstance(argument, FrameVideoProcessor):
                return FrameVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    WithFrameVideoProcessor.__name__ = cls.__name__
    return WithFrameVideoProcessor


class FrameVideoProcessor(VideoProcessorMixin):
    """A torchvision-free stand-in for a square-resize video processor (see the module docstring).

    Args:
        size: output frame side in pixels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, size: int = CROP, mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        self.frame_size = int(size)
        self.frame_mean = list(mean or [0.5, 0.5, 0.5])
        self.frame_std = list(std or [0.5, 0.5, 0.5])

    def __call__(self, videos: Any, **kwargs: Any) -> Any:
        """``videos``: one video or a list of videos, each a list of PIL frames or a ``[T, H, W, 3]`` uint8 array."""
        from transformers.feature_extraction_utils import BatchFeature

        if _is_video(videos):
            videos = [videos]
        mean = torch.tensor(self.frame_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.frame_std).view(1, 3, 1, 1)
        out = []
        for video in videos:
            frames = [self._frame(f) for f in video]
            x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
            out.append((x - mean) / std)
        return BatchFeature({"pixel_values_videos": torch.stack(out)}, tensor_type=kwargs.get("return_tensors"))

    def _frame(self, frame: Any) -> np.ndarray:
        from PIL import Image

        im = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        return np.asarray(im.convert("RGB").resize((self.frame_size, self.frame_size), Image.BICUBIC))


def _is_video(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 4
    return isinstance(x, (list, tuple)) and len(x) > 0 and not isinstance(x[0], (list, tuple, np.ndarray))


def load_frames(name: str, num_frames: int = 4, size: int = 96) -> np.ndarray:
    """``num_frames`` evenly spaced RGB frames of a real clip from ``shared/data/videos``: ``[T, size, size, 3]``."""
    import av
    from PIL import Image

    with av.open(str(VIDEOS / name)) as container:
        frames = list(container.decode(video=0))
    if len(frames) < num_frames:
        raise ValueError(f"{name} has {len(frames)} frames, fewer than {num_frames}")
    pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return np.stack(
        [np.asarray(frames[i].to_image().convert("RGB").resize((size, size), Image.BILINEAR)) for i in pick]
    )


def load_image(name: str, max_side: int = 200) -> Any:
    """A real image from ``shared/data/images``, shrunk so its longer side is ``max_side`` pixels."""
    from PIL import Image

    with Image.open(IMAGES / name) as im:
        im = im.convert("RGB")
    scale = max_side / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)



def stock_greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, mm: dict[str, Any], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the model's own ``forward`` and KV cache, positions given explicitly.

    The prompt runs with ``position_ids = pos``; each new token takes its row's last position + 1.

    Returns:
        ``([B, steps] tokens, [steps, B, V] logits of each step)``.
    """
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=mm, use_cache=True)
        for step in range(steps):
            step_logits = out.logits[:, -1].float()
            logits.append(step_logits)
            nxt = step_logits.argmax(-1)
            tokens.append(nxt)
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                use_cache=True,
            )
    return torch.stack(tokens, 1), torch.stack(logits)


def hand_prune(ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """Delete the ``drop`` columns of each row, left-pad, and keep every token's original position.

    Args:
        ids: ``[B, L]`` input ids (left-padded). mask: ``[B, L]`` attention mask. drop: ``[B, L]`` bool.
        pad: the pad id.

    Returns:
        ``(ids, mask, position_ids)``, each ``[B, L']``.
    """
    pos = mask.long().cumsum(-1) - 1
    keep = mask.bool() & ~drop
    rows = [keep[b].nonzero().squeeze(1) for b in range(ids.shape[0])]
    length = max(int(r.numel()) for r in rows)
    out_ids = torch.full((ids.shape[0], length), pad, dtype=ids.dtype)
    out_mask = torch.zeros(ids.shape[0], length, dtype=mask.dtype)
    out_pos = torch.zeros(ids.shape[0], length, dtype=torch.long)
    for b, cols in enumerate(rows):
        n = int(cols.numel())
        out_ids[b, length - n :] = ids[b, cols]
        out_mask[b, length - n :] = 1
        out_pos[b, length - n :] = pos[b, cols]
    return out_ids, out_mask, out_pos


def match_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each ``[n, D]`` row, the index of the identical row of ``table`` ``[m, D]`` (raises if none)."""
    dist = torch.cdist(rows.double(), table.double())
    best = dist.argmin(1)
    if float(dist.gather(1, best[:, None]).max()) > 1e-5:
        raise AssertionError("a row has no identical row in the table")
    return best


def crop_features(model: Any, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """Per image, the stock ``[patches, h*w, D]`` projected crop features before packing (thumbnail first).

    Recomputed from the vision tower's hidden states and the projector, to tell which crop (and which
    token of it) every packed LLM token comes from, independently of the adapter.
    """
    base = model.model
    cfg = model.config
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    mod = __import__(type(base).__module__, fromlist=["image_size_to_num_patches"])
    counts = [
        int(mod.image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)) for s in sizes
    ]
    if inputs.get("batch_num_images") is not None:
        single = [int(n) == 1 for n in inputs["batch_num_images"] for _ in range(int(n))]
        counts = [c if one else 1 for c, one in zip(counts, single, strict=True)]
    flat = torch.cat([p[:c] for p, c in zip(pv, counts, strict=True)])
    with torch.no_grad():
        hs = base.vision_tower(flat, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hs = hs[:, 1:]
        feats = base.multi_modal_projector(hs)
    return list(torch.split(feats, counts))


def stock_features(model: Any, inputs: dict[str, Any], modality: str) -> list[torch.Tensor]:
    """Per item, the ``[L, D]`` features the stock model fills its placeholders with (newlines included)."""
    base = model.model
    with torch.no_grad():
        if modality == "video":
            return list(base.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output)
        kw = {"batch_num_images": inputs["batch_num_images"]} if inputs.get("batch_num_images") is not None else {}
        out = base.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], **kw)
    return list(out.pooler_output)


def hand_pruned_run(model: Any, adapter: Any, inputs: dict[str, Any], plans: dict[str, Any], steps: int) -> dict[str, Any]:
    """The stock model on inputs pruned by hand as ``plans`` say, kept tokens at their original positions.

    Each compressor token is located in the stock packed features by exact row matching (so the
    adapter's own layout is not trusted); every ``image_newline`` row is kept.

    Returns:
        ``{"tokens": [B, steps], "logits": [steps, B, V], "lengths": [B] prompt lengths, "newlines":
        {modality: per item (kept newline rows, newline rows)}}``.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    newline = model.model.image_newline.detach()
    drop = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    mm, newlines = {}, {}
    for modality, plan in plans.items():
        packed = stock_features(model, inputs, modality)
        encoded = adapter.encode(inputs, modality, "pre_llm", set())
        where = (inputs["input_ids"] == adapter.token_id(modality)).nonzero()
        kept_feats, start, counts = [], 0, []
        for j, rows in enumerate(packed):
            cols = where[start : start + rows.shape[0]]
            start += rows.shape[0]
            is_newline = (rows == newline.to(rows.dtype)).all(-1)
            view = match_rows(encoded.features[j], rows)
            keep = torch.zeros(rows.shape[0], dtype=torch.bool)
            keep[view[plan.row_keep(j).cpu()]] = True
            keep |= is_newline
            drop[cols[~keep, 0], cols[~keep, 1]] = True
            kept_feats.append(rows[keep])
            counts.append((int((keep & is_newline).sum()), int(is_newline.sum())))
        newlines[modality] = counts
        pooled = torch.cat(kept_feats)[None] if modality == "video" else kept_feats
        mm[modality] = BaseModelOutputWithPooling(pooler_output=pooled)
    ids, mask, pos = hand_prune(inputs["input_ids"], inputs["attention_mask"], drop, adapter.pad_id())
    tokens, logits = stock_greedy(model, ids, mask, pos, mm, steps)
    return {"tokens": tokens, "logits": logits, "lengths": mask.sum(1).tolist(), "newlines": newlines}
