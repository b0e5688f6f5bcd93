"""The 2-D sine-cosine position code that testbed-llava's CLIP tower starts from (mmtok.testbed.position_code)."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.dense import half_labels  # noqa: E402
from mmtok.testbed.models import get_spec  # noqa: E402
from mmtok.testbed.position_code import add_position_code, sincos_2d  # noqa: E402
from mmtok.testbed.train import train  # noqa: E402
from mmtok.testbed.train_settings import FRESH_RECIPE  # noqa: E402


def test_sincos_known_values() -> None:
    code = sincos_2d(2, 4)  # one frequency (1 rad per patch): [sin r, cos r, sin c, cos c]
    s, c = math.sin(1.0), math.cos(1.0)
    want = torch.tensor([[0, 1, 0, 1], [0, 1, s, c], [s, c, 0, 1], [s, c, s, c]], dtype=torch.float32)
    assert torch.allclose(code, want, atol=1e-6)
    assert torch.allclose(sincos_2d(16, 96).norm(dim=1), torch.full((256,), math.sqrt(48.0)), atol=1e-4)
    for side, dim in ((0, 8), (4, 6), (4, 0)):
        with pytest.raises(ValueError, match="multiple of 4|side"):
            sincos_2d(side, dim)


def test_the_code_makes_each_half_linearly_readable() -> None:
    # What the learned table of the session-4 model could not do (63 % at layer 0): a linear read-out of
    # the half a patch lies in, exact on the code alone.
    code = sincos_2d(16, 96)
    x = torch.cat([code, torch.ones(256, 1)], 1).double()
    for k in range(2):
        y = half_labels(16)[:, k].double() * 2 - 1
        w = torch.linalg.lstsq(x, y[:, None], driver="gelsd").solution  # rank 31: needs an SVD solver
        assert bool((((x @ w)[:, 0] > 0).long() == half_labels(16)[:, k]).all())


def test_add_position_code_changes_the_patch_rows_only() -> None:
    model, _ = get_spec("testbed-llava").build("tiny", 0)
    table = model.model.vision_tower.embeddings.position_embedding.weight
    before = table.detach().clone()
    add_position_code(model, 2.5)
    side = round((table.shape[0] - 1) ** 0.5)
    assert torch.equal(table[0], before[0])
    assert torch.allclose(table[1:] - before[1:], 2.5 * sincos_2d(side, table.shape[1]), atol=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        add_position_code(model, 0.0)
    qwen, _ = get_spec("testbed-qwen2vl").build("tiny", 0)
    with pytest.raises(ValueError, match="no CLIP position table"):
        add_position_code(qwen, 1.0)


def test_training_adds_the_code_once_and_warm_starts_do_not_add_it_again(tmp_path) -> None:
    torch.set_num_threads(1)
    args = dict(size="tiny", steps=1, batch_size=4, lr=5e-3, warmup=0, seed=0, eval_every=0, log=lambda s: None)
    none = train("testbed-llava", work_dir=tmp_path / "none", until=0, position_code=0.0, **args)
    coded = train("testbed-llava", work_dir=tmp_path / "coded", until=0, position_code=2.0, **args)
    a, b = (r["model"].model.vision_tower.embeddings.position_embedding.weight for r in (none, coded))
    assert torch.allclose(b[1:] - a[1:], 2.0 * sincos_2d(round((a.shape[0] - 1) ** 0.5), a.shape[1]), atol=1e-6)
    assert coded["settings"]["position_code"] == 2.0
    trained = train("testbed-llava", work_dir=tmp_path / "trained", position_code=2.0, **args)
    warm = train("testbed-llava", work_dir=tmp_path / "warm", until=0, init_from=tmp_path / "trained", **args)
    assert warm["settings"]["position_code"] == 0.0
    c, d = (r["model"].model.vision_tower.embeddings.position_embedding.weight for r in (trained, warm))
    assert torch.equal(c, d)


def test_a_warm_start_of_the_shipped_size_adds_no_code_no_curriculum_and_no_fresh_recipe(tmp_path) -> None:
    torch.set_num_threads(1)
    args = dict(size="full", batch_size=1, lr=1e-4, warmup=0, seed=0, eval_every=0, log=lambda s: None)
    fresh = train("testbed-llava", work_dir=tmp_path / "fresh", steps=1, curriculum=0.4, **args)
    spec = get_spec("testbed-llava").train_defaults
    assert fresh["settings"]["position_code"] == spec["position_code"] > 0
    assert fresh["settings"]["curriculum"] == 0.4
    assert {k: fresh["settings"][k] for k in FRESH_RECIPE} == {
        "position_ramp": True, "attention_layers": list(spec["attention_layers"]), "family_mix": spec["family_mix"]}
    warm = train("testbed-llava", work_dir=tmp_path / "warm", steps=1, until=0, init_from=tmp_path / "fresh", **args)
    assert warm["settings"]["position_code"] == 0.0 and warm["settings"]["curriculum"] == 0.0
    assert not set(warm["settings"]) & set(FRESH_RECIPE)
