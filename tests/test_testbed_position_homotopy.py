"""The 1-D -> M-RoPE position homotopy of Qwen2-VL testbed training (mmtok.testbed.position_homotopy)."""

from __future__ import annotations

import pytest
import torch

from mmtok.testbed.data import HELDOUT_SPLIT, item
from mmtok.testbed.models import encode_items, get_spec
from mmtok.testbed.position_homotopy import blended_position_ids, homotopy_weight


@pytest.fixture(scope="module")
def qwen():
    model, processor = get_spec("testbed-qwen2vl").build("tiny", seed=0)
    items = [item("image", HELDOUT_SPLIT, 0), item("video", HELDOUT_SPLIT, 0)]
    batch = encode_items(processor, items)
    batch.pop("labels")
    return model.eval(), batch


def test_weight_rises_linearly_over_the_share_then_stays_at_one():
    assert homotopy_weight(0, 100, 0.5) == 0.0
    assert homotopy_weight(25, 100, 0.5) == pytest.approx(0.5)
    assert homotopy_weight(50, 100, 0.5) == 1.0
    assert homotopy_weight(99, 100, 0.5) == 1.0
    assert homotopy_weight(0, 100, 0.0) == 1.0  # off: stock positions from the start
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        homotopy_weight(0, 100, 1.5)


def test_endpoints_are_1d_and_the_stock_m_rope_positions(qwen):
    model, batch = qwen
    stock, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                          batch["video_grid_thw"], batch["attention_mask"])
    flat = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    assert torch.equal(blended_position_ids(model, batch, 1.0), stock.float())
    zero = blended_position_ids(model, batch, 0.0)
    assert all(torch.equal(zero[axis], flat.float()) for axis in range(3))
    half = blended_position_ids(model, batch, 0.5)
    assert torch.allclose(half, (stock.float() + flat.float()) / 2)
    # M-RoPE packs each image's 2-D grid into fewer positions than its tokens: the endpoints differ.
    assert not torch.equal(stock[0], flat)
    with pytest.raises(ValueError, match="weight"):
        blended_position_ids(model, batch, -0.1)


def test_weight_one_computes_exactly_what_the_stock_forward_does(qwen):
    model, batch = qwen
    with torch.no_grad():
        stock = model(**batch).logits
        blended = model(**batch, position_ids=blended_position_ids(model, batch, 1.0)).logits
        moved = model(**batch, position_ids=blended_position_ids(model, batch, 0.0)).logits
    assert torch.allclose(blended, stock, atol=1e-5)
    assert not torch.allclose(moved, stock, atol=1e-3)


def test_only_qwen2vl_takes_the_homotopy(tmp_path):
    from mmtok.testbed.train import train

    with pytest.raises(ValueError, match="Qwen2-VL"):
        train("testbed-llava", size="tiny", steps=1, position_homotopy=0.5, work_dir=tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train("testbed-qwen2vl", size="tiny", steps=1, position_homotopy=2.0, work_dir=tmp_path, log=lambda _: None)
