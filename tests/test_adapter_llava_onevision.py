"""LLaVA-OneVision adapter on a tiny random model: images (AnyRes, interpolated) and videos (pooled frames)."""

from __future__ import annotations

import pytest
import torch
from tiny_next import (
    FrameVideoProcessor,
    hand_pruned_run,
    load_frames,
    load_image,
    stock_features,
    tiny_llava_onevision,
)

import mmtok
from mmtok.adapters import get_adapter
from mmtok.adapters.llava_onevision import LlavaOnevisionAdapter
from mmtok.api import ProcessorParts, compress_then_generate

STEPS = 4
GEN = {"max_new_tokens": STEPS, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}



@pytest.fixture(scope="module")
def ov_model():
    return tiny_llava_onevision(seed=2)


@pytest.fixture(scope="module")
def media():
    return {
        "wrestling": load_frames("mmaction2_demo_arm_wrestling.mp4", 4),
        "makeup": load_frames("mmaction2_test_eye_makeup.avi", 4),
        "retina": load_image("skimage_retina.jpg", 400),  # 4x4 crops: the model interpolates to 3x3 worth
        "rocket": load_image("skimage_rocket.jpg"),
    }


def batch3(media):
    prompts = ["user <video> what is in the video", "user <image> what", "user <image> then <video> describe"]
    return prompts, [None, media["retina"], media["rocket"]], [media["wrestling"], None, media["makeup"]]


def stock_run(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, **GEN)
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits)


@pytest.mark.parametrize("batch", [1, 3])
def test_identity_equals_stock(ov_model, media, batch):
    model, proc = ov_model
    if batch == 1:
        prompts, images, videos = "user <video> what is in the video", None, media["wrestling"]
    else:
        prompts, images, videos = batch3(media)
    res = compress_then_generate(
        model, proc, prompt=prompts, images=images, videos=videos, method="identity", budget=1.0, **GEN
    )
    inputs = get_adapter(model, proc).prepare(prompts, images=images, videos=videos).inputs
    tokens, logits = stock_run(model, inputs)
    assert torch.equal(res.sequences, tokens)
    torch.testing.assert_close(torch.stack(res.output.logits), logits, atol=1e-5, rtol=1e-5)
    assert res.tokens["sequence"]["seen"] == inputs["attention_mask"].sum(1).tolist()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "batch,stage,budget",
    [
        (1, "pre_llm", mmtok.Budget(1, per="frame")),
        (3, "pre_llm", mmtok.Budget(2, per="frame")),
        (3, "vision", [3, 0.2, mmtok.Budget(0.5, per="frame")]),
    ],
)
def test_pruning_equals_stock_on_hand_pruned_inputs(ov_model, media, batch, stage, budget):
    model, proc = ov_model
    if batch == 1:
        prompts, images, videos = "user <video> what is in the video", None, media["wrestling"]
    else:
        prompts, images, videos = batch3(media)
    adapter = get_adapter(model, proc)
    res = compress_then_generate(
        model, proc, prompt=prompts, images=images, videos=videos, method="random", budget=budget, stage=stage, **GEN
    )
    inputs = adapter.prepare(prompts, images=images, videos=videos).inputs
    ref = hand_pruned_run(model, adapter, inputs, res.plans, STEPS)
    assert ref["newlines"]["video"] == [(1, 1)] * (1 if batch == 1 else 2)
    assert all(kept == total > 0 for kept, total in ref["newlines"].get("image", []))
    assert res.tokens["sequence"]["seen"] == ref["lengths"]
    assert torch.equal(res.sequences, ref["tokens"])
    torch.testing.assert_close(torch.stack(res.output.logits).float(), ref["logits"], atol=1e-4, rtol=1e-4)


def test_per_frame_budget_counts(ov_model, media):
    model, proc = ov_model
    res = compress_then_generate(
        model, proc, prompt=["<video> what", "<video> and"], videos=[media["wrestling"], media["makeup"]],
        method="random", budget=[mmtok.Budget(1, per="frame"), mmtok.Budget(3, per="frame")], **GEN,
    )
    plan = res.plans["video"]
    assert res.grids["video"] == [(4, 2, 2), (4, 2, 2)]
    for j, k in enumerate([1, 3]):
        frames = torch.bincount(plan.row_keep(j) // 4, minlength=4)
        assert frames.tolist() == [k] * 4
    inputs = get_adapter(model, proc).prepare(["<video> what", "<video> and"], videos=[media["wrestling"], media["makeup"]]).inputs
    text = int(inputs["attention_mask"][0].sum()) - 17
    assert res.tokens["sequence"]["seen"] == [text + 4 * 1 + 1, text + 4 * 3 + 1]


def test_interpolated_image_layout(ov_model, media):
    model, proc = ov_model
    adapter = get_adapter(model, proc)
    inputs = adapter.prepare("<image> what", images=media["retina"]).inputs
    (lay,) = adapter.layouts(inputs, "image")
    packed = stock_features(model, inputs, "image")[0]
    # 16 thumbnail tokens, then a 16x16 crop grid shrunk by the model to 12x12, one newline per row
    assert (lay.length, lay.size, len(lay.newline), lay.crops) == (172, 160, 12, (4, 4)) == (packed.shape[0], 160, 12, (4, 4))
    assert lay.source is None and sum(lay.segments) == 160 and len(lay.segments) == 17
    assert lay.segments[0] == 16 and all(s == 9 for s in lay.segments[1:])
    is_newline = (packed == model.model.image_newline.detach()).all(-1)
    assert torch.equal(is_newline.nonzero().squeeze(1), lay.newline)


def test_video_attention_signal_is_pooled_mean_attention(ov_model, media):
    model, proc = ov_model
    adapter = get_adapter(model, proc)
    inputs = adapter.prepare("<video> what", videos=media["wrestling"]).inputs
    encoded = adapter.encode(inputs, "video", "pre_llm", {"cls_attn"})
    tower = model.model.vision_tower
    layer = adapter.signal_layers()["cls_attn"]
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions[layer]
    finally:
        tower.set_attn_implementation("sdpa")
    received = attn.mean(1).mean(1).reshape(4, 1, 4, 4)  # SigLIP has no CLS: mean over heads and queries
    want = torch.nn.functional.avg_pool2d(received, 2).flatten()
    torch.testing.assert_close(encoded.signals["cls_attn"][0], want, atol=1e-5, rtol=1e-4)
    res = compress_then_generate(model, proc, prompt="<video> what", videos=media["wrestling"], method="cls_attn", budget=mmtok.Budget(1, per="frame"), **GEN)
    keep = res.plans["video"].row_keep(0)
    assert keep.tolist() == [4 * f + int(want[4 * f : 4 * f + 4].argmax()) for f in range(4)]


def test_processor_parts_match_stock_processor(ov_model, media):
    model, proc = ov_model
    parts = ProcessorParts(
        proc.tokenizer, proc.image_processor, None,
        {"size": {"height": 56, "width": 56}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    )
    prompts, images, videos = batch3(media)
    stock = get_adapter(model, proc).prepare(prompts, images=images, videos=videos).inputs
    mine = get_adapter(model, parts).prepare(prompts, images=images, videos=videos).inputs
    assert set(stock) == set(mine)
    for key, value in stock.items():
        torch.testing.assert_close(mine[key], value, atol=1e-5, rtol=0)
    assert isinstance(proc.video_processor, FrameVideoProcessor)


def test_bad_budgets_fail_before_encoding(ov_model, media, monkeypatch):
    model, proc = ov_model

    def boom(*a, **k):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(LlavaOnevisionAdapter, "encode", boom)
    for budget in (17, mmtok.Budget(5, per="frame")):
        with pytest.raises(ValueError, match="larger than"):
            compress_then_generate(model, proc, prompt="<video> what", videos=media["wrestling"], method="random", budget=budget)


def test_protected_mask_marks_every_newline(ov_model, media):
    model, proc = ov_model
    adapter = get_adapter(model, proc)
    prompts, images, videos = batch3(media)
    inputs = adapter.prepare(prompts, images=images, videos=videos).inputs
    mask = adapter.protected_mask(inputs)
    newline = model.model.image_newline.detach()
    want = torch.zeros_like(mask)
    for modality in ("image", "video"):
        cols = (inputs["input_ids"] == adapter.token_id(modality)).nonzero()
        rows = torch.cat([f if f.dim() == 2 else f.flatten(0, 1) for f in stock_features(model, inputs, modality)])
        is_newline = (rows == newline).all(-1)
        want[cols[is_newline, 0], cols[is_newline, 1]] = True
    assert torch.equal(mask, want) and int(mask.sum()) == 12 + 10 + 1 + 1  # retina, rocket rows; two videos


def test_saved_checkpoint_loads_and_runs_without_torchvision(ov_model, media, tmp_path):
    """``mmtok.load`` of a saved checkpoint: the stock processor needs torchvision, so its parts are used."""
    import json

    model, proc = ov_model
    model.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    video = {
        "size": {"height": 56, "width": 56}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "video_processor_type": "LlavaOnevisionVideoProcessor",  # as the real checkpoints save it
    }
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    loaded, parts = mmtok.load(str(tmp_path))
    assert isinstance(parts, ProcessorParts)
    prompts, images, videos = batch3(media)
    res = compress_then_generate(
        loaded, parts, prompt=prompts, images=images, videos=videos, method="identity", budget=1.0, **GEN
    )
    inputs = get_adapter(model, proc).prepare(prompts, images=images, videos=videos).inputs
    tokens, logits = stock_run(model, inputs)
    assert torch.equal(res.sequences, tokens)
    torch.testing.assert_close(torch.stack(res.output.logits), logits, atol=1e-5, rtol=1e-5)


def test_llm_stage_feeds_packed_features_and_keeps_newlines(ov_model, media):
    model, proc = ov_model
    prompts, images, videos = batch3(media)
    inputs = get_adapter(model, proc).prepare(prompts, images=images, videos=videos).inputs
    want_ids, want_logits = stock_run(model, inputs)
    full = compress_then_generate(
        model, proc, prompt=prompts, images=images, videos=videos, method="identity", stage="llm", budget=1.0, layer=0, **GEN
    )
    assert torch.equal(full.sequences, want_ids)
    torch.testing.assert_close(torch.stack(full.output.logits), want_logits, atol=1e-4, rtol=1e-4)
    res = compress_then_generate(
        model, proc, prompt=prompts, images=images, videos=videos,
        method=mmtok.create_compressor("fastv", layer=1), budget=6, max_new_tokens=2, do_sample=False,
    )
    seq = res.tokens["sequence"]
    assert seq["kv"] == seq["after"]
    newlines = [12 * 0 + 1, 12, 10 + 1]  # per row: video newline; retina's; rocket's plus the second video's
    kept = [res.tokens["image"]["after"][b] + res.tokens["video"]["after"][b] for b in range(3)]
    assert kept == [6 + n for n in newlines]
