"""LLaVA-NeXT adapter on a tiny random model: parity with the stock model, per-crop budgets, newlines, GlobalCom2."""

from __future__ import annotations

import pytest
import torch
from tiny_next import crop_features, hand_pruned_run, load_image, match_rows, stock_features, tiny_llava_next

import mmtok
from mmtok.adapters import get_adapter
from mmtok.adapters.llava_next import LlavaNextAdapter
from mmtok.api import compress_then_generate

STEPS = 4
GEN = {"max_new_tokens": STEPS, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}



@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=1)


@pytest.fixture(scope="module")
def media():
    return {
        "rocket": load_image("skimage_rocket.jpg"),  # wide: 2x2 crops, top and bottom rows unpadded
        "receipt": load_image("cord_receipt_test_00004.jpg"),  # tall
        "cat": load_image("skimage_chelsea_cat.png"),
    }


def batch3(media):
    prompts = ["user <image> what is in the image", "what is the answer", "user <image> and <image> describe"]
    return prompts, [media["rocket"], None, [media["cat"], media["receipt"]]]


def stock_run(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, **GEN)
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits)


def crop_of_packed(model, inputs, packed):
    """Per image, the (crop, token) of every packed row (-1, -1 for newlines), from the stock crop features."""
    crops = crop_features(model, inputs)
    newline = model.model.image_newline.detach()
    out = []
    for feats, rows in zip(crops, packed, strict=True):
        table = torch.cat([feats.reshape(-1, feats.shape[-1]), newline[None]])
        idx = match_rows(rows, table)
        t = feats.shape[1]
        crop = torch.where(idx == table.shape[0] - 1, -1, idx // t)
        out.append(crop)
    return out


def check_against_hand_pruned(model, adapter, inputs, result):
    """The adapter's generation equals the stock model run on hand-pruned inputs (every step)."""
    ref = hand_pruned_run(model, adapter, inputs, result.plans, STEPS)
    for kept, total in ref["newlines"]["image"]:
        assert kept == total > 0
    assert result.tokens["sequence"]["seen"] == ref["lengths"]
    assert torch.equal(result.sequences, ref["tokens"])
    torch.testing.assert_close(torch.stack(result.output.logits).float(), ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_identity_equals_stock(next_model, media, batch):
    model, proc = next_model
    if batch == 1:
        prompts, images = "user <image> what is in the image", media["rocket"]
    else:
        prompts, images = batch3(media)
    res = compress_then_generate(model, proc, prompt=prompts, images=images, method="identity", budget=1.0, **GEN)
    inputs = get_adapter(model, proc).prepare(prompts, images=images).inputs
    tokens, logits = stock_run(model, inputs)
    assert torch.equal(res.sequences, tokens)
    torch.testing.assert_close(torch.stack(res.output.logits), logits, atol=1e-5, rtol=1e-5)
    assert res.tokens["sequence"]["seen"] == inputs["attention_mask"].sum(1).tolist()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("stage", ["pre_llm", "vision"])
@pytest.mark.parametrize("batch", [1, 3])
def test_pruning_equals_stock_on_hand_pruned_inputs(next_model, media, batch, stage):
    model, proc = next_model
    prompts, images = ("user <image> what is in the image", media["rocket"]) if batch == 1 else batch3(media)
    adapter = get_adapter(model, proc)
    budget = mmtok.Budget(3, per="crop") if batch == 1 else [10, 0.5, mmtok.Budget(0.3, per="crop")]
    res = compress_then_generate(model, proc, prompt=prompts, images=images, method="random", budget=budget, stage=stage, **GEN)
    check_against_hand_pruned(model, adapter, adapter.prepare(prompts, images=images).inputs, res)


def test_per_crop_budget_counts_and_crop_order(next_model, media):
    model, proc = next_model
    adapter = get_adapter(model, proc)
    prompts, images = batch3(media)
    inputs = adapter.prepare(prompts, images=images).inputs
    packed = stock_features(model, inputs, "image")
    crop = crop_of_packed(model, inputs, packed)
    encoded = adapter.encode(inputs, "image", "pre_llm", set())
    res = compress_then_generate(
        model, proc, prompt=prompts, images=images, method="random", budget=mmtok.Budget(5, per="crop"), **GEN
    )
    plan = res.plans["image"]
    for j, rows in enumerate(packed):
        view_crop = crop[j][match_rows(encoded.features[j], rows)]
        # the compressor sees crop after crop (thumbnail first), each crop's tokens contiguous
        segs = torch.unique_consecutive(view_crop, return_counts=True)
        assert segs[0].tolist() == sorted(set(crop[j][crop[j] >= 0].tolist()))
        assert encoded.segments[j] == segs[1].tolist()
        assert segs[1][0] == 16  # the thumbnail is whole
        kept_crop = view_crop[plan.row_keep(j)]
        counts = torch.bincount(kept_crop, minlength=int(segs[0].max()) + 1)[segs[0]]
        assert counts.tolist() == [min(5, n) for n in segs[1].tolist()]
    # 3 items x (segments x 5) visual tokens kept, plus every newline token
    newlines = [sum(int(c == -1) for c in cj) for cj in crop]
    kept = [int(plan.mask[j].sum()) + newlines[j] for j in range(len(packed))]
    lengths = inputs["attention_mask"].sum(1)
    placeholders = [len(p) for p in packed]
    assert res.tokens["sequence"]["seen"] == [
        int(lengths[0]) - placeholders[0] + kept[0],
        int(lengths[1]),
        int(lengths[2]) - placeholders[1] - placeholders[2] + kept[1] + kept[2],
    ]


def test_newlines_survive_any_budget_and_merging(next_model, media):
    model, proc = next_model
    adapter = get_adapter(model, proc)
    for method, budget in [("random", 1), ("tome", 2), ("pool", mmtok.Budget(1, per="crop"))]:
        req = adapter.prepare("user <image> what", images=media["rocket"])
        encoded = adapter.encode(req.inputs, "image", "pre_llm", set())
        tokens = adapter.visual_tokens(req, encoded, "pre_llm", "image")
        plan = adapter.plan(mmtok.create_compressor(method), tokens, [budget])
        kept = adapter.kept_features(encoded, plan, "pre_llm")[0]
        rows = encoded.layouts[0].length - encoded.layouts[0].size
        is_newline = (kept == model.model.image_newline.detach()).all(-1)
        assert int(is_newline.sum()) == rows == 6
        assert kept.shape[0] == int(plan.counts[0]) + rows
        spliced = adapter.splice(req, {"image": plan}, {"image": [kept]})
        n_img = int((spliced.kwargs["input_ids"] == model.config.image_token_id).sum())
        assert n_img == kept.shape[0]


def test_crop_importance_known_answer(next_model):
    model, proc = next_model
    adapter = get_adapter(model, proc)
    from mmtok.adapters.anyres import Layout

    lay = Layout(
        length=0, order=torch.arange(6), newline=torch.tensor([], dtype=torch.long), segments=[2, 1, 1, 1, 1],
        crop_of=torch.tensor([0, 0, 1, 2, 3, 4]), crops=(2, 2),
    )
    attn = torch.zeros(4, 4)
    attn[3, 0] = 0.6  # bottom-left quarter of the thumbnail: crop (1, 0) = crop 3
    attn[0, 3] = 0.4  # top-right quarter: crop (0, 1) = crop 2
    s = torch.tensor([0.0, 0.4, 0.6, 0.0])
    for tau in (10.0, 0.05):
        adapter.crop_temperature = tau
        sigma = torch.softmax((s - s.max()) / tau, 0)
        want = torch.cat([torch.ones(2), 1 + sigma - 0.25])
        got = adapter.crop_importance(lay, attn.flatten())
        torch.testing.assert_close(got, want)


def test_adaptive_budget_follows_thumbnail_attention(next_model, media, monkeypatch):
    model, proc = next_model
    adapter = get_adapter(model, proc)
    monkeypatch.setattr(LlavaNextAdapter, "crop_temperature", 1e-3)
    image = media["receipt"]
    inputs = adapter.prepare("user <image> what", images=image).inputs
    # The thumbnail's CLS attention at the selected layer, read from an eager run of the stock tower.
    tower = model.model.vision_tower
    layer = adapter.signal_layers()["cls_attn"]
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = tower(inputs["pixel_values"][0, :1], output_attentions=True).attentions[layer]
    finally:
        tower.set_attn_implementation("sdpa")
    thumb = attn[0, :, 0, 1:].mean(0).reshape(4, 4)
    lay = adapter.layouts(inputs, "image")[0]
    rows, cols = lay.crops
    region = [thumb[r * 4 // rows : (r + 1) * 4 // rows, c * 4 // cols : (c + 1) * 4 // cols].sum() for r in range(rows) for c in range(cols)]
    favourite = 1 + int(torch.stack(region).argmax())
    res = compress_then_generate(
        model, proc, prompt="user <image> what", images=image, method="random",
        budget=mmtok.Budget(0.25, per="crop", allocation="adaptive"), **GEN,
    )
    kept = torch.bincount(lay.crop_of[res.plans["image"].row_keep(0)], minlength=rows * cols + 1)
    per_crop = [int(kept[c]) for c in range(1, rows * cols + 1) if (lay.crop_of == c).any()]
    fixed = [max(1, int(0.25 * int((lay.crop_of == c).sum()) + 0.5)) for c in range(1, rows * cols + 1)]
    assert int(kept[favourite]) == max(per_crop) > fixed[favourite - 1]
    assert int(kept.sum()) == sum(max(1, int(0.25 * n + 0.5)) for n in lay.segments)
    assert model.config._attn_implementation == "sdpa"


def test_bad_budgets_fail_before_encoding(next_model, media, monkeypatch):
    model, proc = next_model

    def boom(*a, **k):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(LlavaNextAdapter, "encode", boom)
    with pytest.raises(ValueError, match="larger than"):
        compress_then_generate(model, proc, prompt="<image> what", images=media["rocket"], method="random", budget=65)
    with pytest.raises(ValueError, match="larger than"):
        compress_then_generate(
            model, proc, prompt="<image> what", images=media["rocket"], method="random", budget=mmtok.Budget(13, per="crop")
        )


def test_saved_checkpoint_loads_with_stock_processor(next_model, media, tmp_path):
    model, proc = next_model
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, processor = mmtok.load(str(tmp_path))
    assert type(processor).__name__ == "LlavaNextProcessor"
    prompts, images = batch3(media)
    res = compress_then_generate(loaded, processor, prompt=prompts, images=images, method="identity", budget=1.0, **GEN)
    tokens, logits = stock_run(model, get_adapter(model, proc).prepare(prompts, images=images).inputs)
    assert torch.equal(res.sequences, tokens)
    torch.testing.assert_close(torch.stack(res.output.logits), logits, atol=1e-5, rtol=1e-5)
