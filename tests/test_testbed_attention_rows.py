"""query_rows: one head's attention rows under SDPA equal what eager attention returns."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.attention_rows import answer_query_positions, query_rows  # noqa: E402
from mmtok.testbed.data import dataset  # noqa: E402
from mmtok.testbed.dense import attention_loss  # noqa: E402
from mmtok.testbed.models import encode_items, get_spec  # noqa: E402


def test_answer_query_positions_known_answer() -> None:
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, -100, 9]])
    assert answer_query_positions(labels).tolist() == [[1, 2], [3, -1]]


def _two_layer_model(name: str):
    spec = get_spec(name)
    size = replace(spec.sizes["tiny"], text_layers=2, text_heads=4, text_kv_heads=2)
    model, processor = spec.build(size, seed=0)
    return model.eval(), processor, spec


@pytest.mark.parametrize("name", ["testbed-llava", "testbed-qwen2vl", "testbed-audio"])
def test_rows_equal_eager_attention(name: str) -> None:
    model, processor, spec = _two_layer_model(name)
    # Two media of one kind at different prompt lengths (right padding), and for Qwen2-VL a video row too.
    items = [it for m in spec.modalities for it in dataset(m, "test", 2, 3, form="mixed")]
    batch = encode_items(processor, items)
    positions = answer_query_positions(batch["labels"])
    assert (positions >= 0).sum() >= len(items)
    assert (batch["attention_mask"] == 0).any()  # padded rows: the mask path, not only the causal one
    with torch.no_grad():
        model.model.language_model.set_attn_implementation("eager")
        eager = model(**batch, output_attentions=True)
        model.model.language_model.set_attn_implementation("sdpa")
        for layer in (0, 1):
            for head in (0, 3):
                with query_rows(model, layer, positions, head) as rows:
                    out = model(**batch)
                assert torch.allclose(out.logits, eager.logits, atol=1e-4)
                for b in range(len(items)):
                    for p in positions[b][positions[b] >= 0].tolist():
                        want = eager.attentions[layer][b, head, p]
                        assert torch.allclose(rows.at(b, p), want, atol=1e-5), (layer, head, b, p)
                assert (rows.probs[positions < 0] == 0).all()
    assert model.config.text_config._attn_implementation == "sdpa"  # given back


def test_rows_carry_gradients_and_feed_attention_loss() -> None:
    model, processor, spec = _two_layer_model("testbed-llava")
    items = list(dataset("image", "test", 2, 1, form="mixed"))
    batch = encode_items(processor, items)
    positions = answer_query_positions(batch["labels"])
    with query_rows(model, 1, positions) as rows:
        model(**batch)
    cells = torch.full(batch["labels"].shape, -1)
    image = batch["input_ids"] == model.config.image_token_id
    cells[image] = torch.arange(int(image.sum(1)[0])).repeat(len(items))
    key = torch.zeros(len(items), int(image.sum(1)[0]), dtype=torch.long)
    key[:, :3] = 1
    loss = attention_loss(rows, batch["labels"], cells, key)
    first = [int((batch["labels"][b] != -100).nonzero()[0, 0]) - 1 for b in range(len(items))]
    want = torch.stack([-torch.log(rows.at(b, p)[cells[b] >= 0][:3].sum()) for b, p in enumerate(first)]).mean()
    assert torch.allclose(loss, want)
    loss.backward()
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_query_rows_rejects_bad_layer_and_head() -> None:
    model, _, _ = _two_layer_model("testbed-llava")
    with pytest.raises(ValueError, match="layer 2 out of range"):
        with query_rows(model, 2, torch.zeros(1, 1, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="head 4 out of range"):
        with query_rows(model, 0, torch.zeros(1, 1, dtype=torch.long), head=4):
            pass
