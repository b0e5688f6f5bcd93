"""Qwen2-VL / Qwen2.5-VL adapter: stock equality at full budget and on hand-pruned inputs (3-D M-RoPE ids)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image
from tiny_models import (
    COFFEE,
    IMAGES,
    VIDEOS,
    assert_same_run,
    greedy_kwargs,
    hooks_left,
    manual_greedy,
)

import mmtok
from mmtok.adapters import get_adapter
from mmtok.adapters.qwen2_vl import video_patches

# session fixtures shared with the other adapter tests (pytest finds them by these names)
qwen, qwen_dir = tiny_models.qwen, tiny_models.qwen_dir

ASTRONAUT = IMAGES / "skimage_astronaut.png"
VIDEO = VIDEOS / "mmaction2_demo_arm_wrestling.mp4"
PROMPTS = [
    "<|im_start|>user\n<image> and <video> what happens?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDescribe <image> please<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nwhat is a cat?<|im_end|>\n<|im_start|>assistant\n",
]
IMAGES_PER_ROW = [str(COFFEE), str(ASTRONAUT), None]
VIDEOS_PER_ROW = [str(VIDEO), None, None]



@pytest.mark.parametrize("batch", [1, 3])
def test_identity_equals_the_stock_model_with_images_and_videos(qwen, batch):
    model, processor = qwen
    kw = dict(prompt=PROMPTS[:batch], images=IMAGES_PER_ROW[:batch], videos=VIDEOS_PER_ROW[:batch])
    res = mmtok.compress_then_generate(model, processor, method="identity", budget=1.0, **kw, **greedy_kwargs())
    inputs = get_adapter(model, processor).prepare(kw["prompt"], kw["images"], kw["videos"]).inputs
    ref = model.generate(**inputs, **greedy_kwargs())
    assert_same_run(res, ref.logits, ref.sequences[:, inputs["input_ids"].shape[1] :])
    assert res.tokens["video"]["before"] == res.tokens["video"]["after"] == [48, 0, 0][:batch]
    assert res.tokens["image"]["after"] == [12, 16, 0][:batch]  # 600x400 -> 6x8 patches, 512x512 -> 8x8
    assert res.tokens["sequence"]["seen"] == inputs["attention_mask"].sum(1).tolist()


def test_process_matches_the_stock_qwen2vl_processor_on_images(qwen):
    """The adapter builds inputs from the processor's parts exactly as Qwen2VLProcessor does."""
    from transformers import Qwen2VLProcessor

    class ImagesOnly(Qwen2VLProcessor):  # the stock class, minus the torchvision-only video processor check
        def check_argument_for_proper_class(self, name, arg):
            return type(arg) if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    model, processor = qwen
    stock = ImagesOnly(image_processor=processor.image_processor, tokenizer=processor.tokenizer, video_processor=None)
    adapter = get_adapter(model, processor)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[1].replace("<image>", "<image> <image>")]
    images = [str(COFFEE), None, [str(ASTRONAUT), str(COFFEE)]]
    ours = adapter.prepare(prompts, images).inputs
    marker = adapter.placeholder("image")
    stock.tokenizer.padding_side = "left"
    want = stock(
        text=[p.replace("<image>", marker) for p in prompts],
        images=[Image.open(p).convert("RGB") for p in (COFFEE, ASTRONAUT, COFFEE)],
        padding=True,
        return_tensors="pt",
    )
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(ours[key], want[key]), key


def test_video_patches_use_the_image_processor_layout():
    """Two identical frames give exactly the image processor's patches of that frame (same layout, same pixels)."""
    from tiny_models import QWEN_SIZE
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = np.asarray(Image.open(COFFEE).convert("RGB"))
    cfg = {
        "size": QWEN_SIZE, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255,
    }
    patches, grid = video_patches(np.stack([frame, frame]), cfg)
    ref = Qwen2VLImageProcessorPil(size=dict(QWEN_SIZE))(images=[Image.fromarray(frame)], return_tensors="np")
    assert grid == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5)
    three, grid3 = video_patches(np.stack([frame, frame, frame]), cfg)  # odd T: the last frame repeats
    assert grid3[0] == 2 and np.array_equal(three[: len(patches)], patches)


def hand_pruned(model, inputs, kept, keeps):
    """Drop the unkept placeholders, put the kept features in, keep the stock M-RoPE ids of what remains."""
    base = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    if "second_per_grid_ts" in inputs:
        kw["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    rope, _ = base.get_rope_index(ids, inputs["mm_token_type_ids"], attention_mask=mask, **kw)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    lengths = {m: (inputs[f"{m}_grid_thw"].prod(-1) // 4).tolist() for m in ("image", "video") if f"{m}_grid_thw" in inputs}
    token = {"image": model.config.image_token_id, "video": model.config.video_token_id}
    counter = {m: 0 for m in lengths}
    rows = []
    for b in range(ids.shape[0]):
        cols = [int(c) for c in torch.arange(ids.shape[1])[mask[b].bool()]]
        keep_cols = [c for c in cols if int(ids[b, c]) not in token.values()]
        e = emb[b].clone()
        for m in lengths:
            ph = [c for c in cols if int(ids[b, c]) == token[m]]
            start = 0
            while start < len(ph):
                j = counter[m]
                item = ph[start : start + lengths[m][j]]
                chosen = [item[i] for i in keeps[m][j].tolist()]
                e[chosen] = kept[m][j]
                keep_cols += chosen
                start += lengths[m][j]
                counter[m] += 1
        keep_cols = sorted(keep_cols)
        rows.append((e[keep_cols], rope[:, b, keep_cols]))
    length = max(r[0].shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, emb.shape[-1])
    new_mask = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(4, len(rows), length, dtype=torch.long)
    for b, (e, p) in enumerate(rows):
        n = e.shape[0]
        embeds[b, length - n :] = e
        new_mask[b, length - n :] = 1
        pos[0, b, length - n :] = torch.arange(n)
        pos[1:, b, length - n :] = p
    return embeds, new_mask, pos


@pytest.mark.parametrize("method,stage,budget", [("random", "pre_llm", 0.5), ("cls_attn", "vision", 5)])
def test_pruned_equals_the_stock_model_on_hand_pruned_inputs(qwen, method, stage, budget):
    model, processor = qwen
    kw = dict(prompt=PROMPTS, images=IMAGES_PER_ROW, videos=VIDEOS_PER_ROW)
    res = mmtok.compress_then_generate(
        model, processor, method=method, budget=budget, stage=stage, **kw, **greedy_kwargs(4)
    )
    inputs = get_adapter(model, processor).prepare(**kw).inputs
    with torch.no_grad():
        img = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        vid = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    keeps = {m: [res.plans[m].row_keep(j) for j in range(res.plans[m].keep.shape[0])] for m in ("image", "video")}
    want = {"image": [6, 8], "video": [24]} if budget == 0.5 else {"image": [5, 5], "video": [5]}
    assert {m: [len(k) for k in v] for m, v in keeps.items()} == want
    kept = {"image": [img[j][keeps["image"][j]] for j in range(2)], "video": [vid[0][keeps["video"][0]]]}
    embeds, mask, pos = hand_pruned(model, inputs, kept, keeps)
    logits, tokens = manual_greedy(model, embeds, mask, pos, 4, eos=model.generation_config.eos_token_id)
    assert_same_run(res, logits, tokens)
    # real lengths, and the rope deltas generation continues from
    assert res.tokens["sequence"]["seen"] == res.tokens["sequence"]["after"] == mask.sum(1).tolist()
    before = inputs["attention_mask"].sum(1).tolist()
    dropped = [12 - want["image"][0] + 48 - want["video"][0], 16 - want["image"][1], 0]
    assert res.tokens["sequence"]["after"] == [n - d for n, d in zip(before, dropped, strict=True)]
    deltas = pos[1:].amax(dim=(0, 2)) + 1 - mask.sum(1)
    assert torch.equal(model.model.rope_deltas.flatten(), deltas)


def test_second_per_grid_ts_follows_the_sampled_fps(qwen):
    model, processor = qwen
    req = get_adapter(model, processor).prepare(PROMPTS[0], images=str(COFFEE), videos=str(VIDEO))
    if model.config.model_type == "qwen2_vl":
        assert "second_per_grid_ts" not in req.inputs
    else:  # 8 frames sampled over the 10 s clip: 0.8 fps, 2 frames per temporal patch -> 2.5 s per grid step
        torch.testing.assert_close(req.inputs["second_per_grid_ts"], torch.tensor([2.5]))


def test_attention_signal_is_the_eager_attention_received(qwen, qwen_dir):
    """cls_attn (mean attention received, summed per 2x2 unit) equals the eager tower's real weights."""
    model, processor = qwen
    eager, _ = mmtok.load(qwen_dir, attn_implementation="eager")
    adapter = get_adapter(eager, processor)
    req = adapter.prepare(PROMPTS[0], images=str(COFFEE), videos=str(VIDEO))
    block = eager.model.visual.blocks[adapter.signal_layers()["cls_attn"]].attn
    module = sys.modules[type(block).__module__]
    original, active, weights = module.eager_attention_forward, [], []

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        if active:
            weights.append(w[0].float())  # [H, n, n] per attention block (frame or window)
        return out, w

    pre = block.register_forward_pre_hook(lambda *a: active.append(1))
    post = block.register_forward_hook(lambda *a: active.clear())
    module.eager_attention_forward = recording
    try:
        for m in ("image", "video"):
            weights.clear()
            enc = adapter.encode(req.inputs, m, "vision", {"cls_attn"})
            received = torch.cat([w.mean(0).mean(0) for w in weights])  # per patch, in the tower's order
            score = received.view(-1, 4).sum(1)
            if hasattr(eager.model.visual, "window_size"):
                from transformers.vision_utils import get_vision_window_index

                v = eager.model.visual
                index, _ = get_vision_window_index(req.inputs[f"{m}_grid_thw"], 2, v.window_size, v.patch_size)
                score = score[torch.argsort(index)]
            torch.testing.assert_close(enc.signals["cls_attn"][0], score, atol=1e-5, rtol=1e-4)
    finally:
        module.eager_attention_forward = original
        pre.remove()
        post.remove()


def test_sdpa_model_stays_on_sdpa_and_no_hook_is_left(qwen):
    model, processor = qwen
    before = hooks_left(model)
    mmtok.compress_then_generate(
        model, processor, prompt=PROMPTS[0], images=str(COFFEE), videos=str(VIDEO), method="cls_attn", budget=4,
        max_new_tokens=2,
    )
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert hooks_left(model) == before


def test_per_frame_budgets_and_the_chat_template(qwen):
    model, processor = qwen
    req = get_adapter(model, processor).prepare("What happens?", images=str(COFFEE), videos=str(VIDEO))
    assert req.prompts == [
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "What happens?<|im_end|>\n<|im_start|>assistant\n"
    ]
    res = mmtok.compress_then_generate(
        model, processor, prompt="What happens?", videos=str(VIDEO), method="random",
        budget=mmtok.Budget(2, per="frame"), max_new_tokens=1,
    )
    assert res.grids["video"] == [(4, 3, 4)]  # 8 frames -> 4 temporal patches of 3x4 merged tokens
    keep = res.plans["video"].row_keep(0)
    assert torch.bincount(keep // 12, minlength=4).tolist() == [2, 2, 2, 2]


def test_video_placeholder_without_a_video_is_an_error(qwen):
    model, processor = qwen
    with pytest.raises(ValueError, match="video placeholder"):
        mmtok.compress_then_generate(model, processor, prompt="what happens in <video>?", method="random", budget=2)
