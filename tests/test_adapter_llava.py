"""LLaVA-1.5 adapter: equality with the stock model at full budget and on hand-pruned inputs."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from PIL import Image
from tiny_models import (
    COFFEE,
    IMAGES,
    assert_same_run,
    greedy_kwargs,
    hooks_left,
    manual_greedy,
)

import mmtok

# session fixtures shared with the other adapter tests (pytest finds them by these names)
llava, llava_dir = tiny_models.llava, tiny_models.llava_dir

PROMPTS = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "USER: <image>\nDescribe the picture in one sentence please. ASSISTANT:",
    "USER: what is a cat? ASSISTANT:",
]
ASTRONAUT = IMAGES / "skimage_astronaut.png"


def rgb(path):
    return Image.open(path).convert("RGB")


def stock_inputs(processor, prompts, images):
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=prompts, images=images, padding=True, return_tensors="pt"))



@pytest.mark.parametrize("batch", [1, 3])
def test_identity_equals_the_stock_model(llava, batch):
    model, processor = llava
    prompts = PROMPTS[:batch]
    images = [str(COFFEE), str(ASTRONAUT), None][:batch]
    res = mmtok.compress_then_generate(
        model, processor, prompt=prompts, images=images, method="identity", budget=1.0, **greedy_kwargs()
    )
    inputs = stock_inputs(processor, prompts, [rgb(p) for p in images if p])
    ref = model.generate(**inputs, **greedy_kwargs())
    new = ref.sequences[:, inputs["input_ids"].shape[1] :]
    assert_same_run(res, ref.logits, new)
    assert res.text == processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    # every image keeps its 16 tokens; the model saw exactly the processor's sequence lengths
    assert res.tokens["image"]["after"] == res.tokens["image"]["before"] == [16, 16, 0][:batch]
    assert res.tokens["sequence"]["seen"] == inputs["attention_mask"].sum(1).tolist()


def hand_pruned(model, inputs, kept_features, keeps):
    """The stock model's inputs with dropped placeholders removed, kept features in place, original positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_id = model.config.image_token_id
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows, item = [], 0
    for b in range(ids.shape[0]):
        cols = torch.arange(ids.shape[1])[mask[b].bool()]
        ph = [int(c) for c in cols if ids[b, c] == image_id]
        keep_cols = [int(c) for c in cols if ids[b, c] != image_id]
        e = emb[b].clone()
        for start in range(0, len(ph), 16):
            item_cols = ph[start : start + 16]
            chosen = [item_cols[i] for i in keeps[item].tolist()]
            e[chosen] = kept_features[item]
            keep_cols += chosen
            item += 1
        keep_cols = sorted(keep_cols)
        rows.append((e[keep_cols], pos[b, keep_cols]))
    length = max(r[0].shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, emb.shape[-1])
    new_mask = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (e, p) in enumerate(rows):
        embeds[b, length - e.shape[0] :] = e
        new_mask[b, length - e.shape[0] :] = 1
        positions[b, length - e.shape[0] :] = p
    return embeds, new_mask, positions


@pytest.mark.parametrize("method,stage,budget", [("random", "vision", 5), ("cls_attn", "pre_llm", 0.5)])
def test_pruned_equals_the_stock_model_on_hand_pruned_inputs(llava, method, stage, budget):
    model, processor = llava
    images = [str(COFFEE), str(ASTRONAUT), None]
    res = mmtok.compress_then_generate(
        model, processor, prompt=PROMPTS, images=images, method=method, budget=budget, stage=stage,
        **greedy_kwargs(4),
    )
    plan = res.plans["image"]
    k = 5 if budget == 5 else 8
    assert plan.counts.tolist() == [k, k]
    keeps = [plan.row_keep(j) for j in range(2)]
    inputs = stock_inputs(processor, PROMPTS, [rgb(p) for p in images if p])
    with torch.no_grad():
        if stage == "vision":
            hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
            kept = [model.model.multi_modal_projector(hidden[j, keeps[j]]) for j in range(2)]
        else:
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            kept = [feats[j][keeps[j]] for j in range(2)]
    embeds, mask, positions = hand_pruned(model, inputs, kept, keeps)
    logits, tokens = manual_greedy(model, embeds, mask, positions, 4, eos=model.generation_config.eos_token_id)
    assert_same_run(res, logits, tokens)
    # token counts are the real lengths: 16 -> k per image, the prompt shorter by 16 - k per image
    before = inputs["attention_mask"].sum(1).tolist()
    assert res.tokens["sequence"]["before"] == before
    assert res.tokens["sequence"]["seen"] == res.tokens["sequence"]["after"] == mask.sum(1).tolist()
    assert res.tokens["sequence"]["after"] == [before[0] - 16 + k, before[1] - 16 + k, before[2]]
    assert res.tokens["image"]["after"] == [k, k, 0]


def test_cls_attention_signal_is_the_eager_cls_row(llava, llava_dir):
    """cls_attn keeps the top tokens of the CLS row at the selected layer (-2), read here from an eager copy."""
    model, processor = llava
    eager, _ = mmtok.load(llava_dir, attn_implementation="eager")
    inputs = stock_inputs(processor, PROMPTS[:2], [rgb(COFFEE), rgb(ASTRONAUT)])
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    layers = len(att)
    cls_row = att[layers - 2][:, :, 0, 1:].mean(1)  # layer producing hidden_states[-2], heads averaged
    res = mmtok.compress_then_generate(
        model, processor, prompt=PROMPTS[:2], images=[str(COFFEE), str(ASTRONAUT)], method="cls_attn", budget=6,
        max_new_tokens=1,
    )
    for j in range(2):
        want = torch.sort(torch.argsort(cls_row[j], descending=True, stable=True)[:6]).values
        assert torch.equal(res.plans["image"].row_keep(j), want)


def test_sdpa_model_stays_on_sdpa_and_no_hook_is_left(llava):
    model, processor = llava
    assert model.config._attn_implementation == "sdpa"
    before = hooks_left(model)
    mmtok.compress_then_generate(
        model, processor, prompt=PROMPTS[0], images=str(COFFEE), method="cls_attn", budget=4, stage="vision",
        max_new_tokens=2,
    )
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert hooks_left(model) == before


def test_merging_at_the_vision_stage_projects_the_merged_tokens(llava):
    """A merge plan at the vision stage: the LM sees the projector applied to size-weighted means."""
    model, processor = llava
    res = mmtok.compress_then_generate(
        model, processor, prompt=PROMPTS[0], images=str(COFFEE), method="tome", budget=6, stage="vision",
        max_new_tokens=1,
    )
    plan = res.plans["image"]
    assert plan.merging and plan.counts.tolist() == [6]
    assert res.tokens["image"]["after"] == [6]
    assert res.tokens["sequence"]["seen"] == [res.tokens["sequence"]["before"][0] - 10]
