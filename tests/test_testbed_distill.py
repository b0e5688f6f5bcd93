"""Feature distillation of a testbed's image tokens from a trained Llava testbed (mmtok.testbed.distill)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtok.testbed.data import dataset
from mmtok.testbed.distill import FeatureTeacher, feature_distill_loss, fit_output_layer
from mmtok.testbed.media_grid import grid_inputs
from mmtok.testbed.models import encode_items, get_spec
from mmtok.testbed.train import FIT_ITEMS, StepBatches, train

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "assets" / "testbed-llava"


@pytest.fixture(scope="module")
def teacher():
    return FeatureTeacher(LLAVA)


def test_distill_loss_known_values():
    teacher = torch.tensor([[[3.0, 4.0], [0.0, 5.0]]])  # mean squared norm 25
    assert float(feature_distill_loss(teacher.clone(), teacher)) == 0.0
    assert float(feature_distill_loss(torch.zeros_like(teacher), teacher)) == pytest.approx(1.0)
    student = torch.tensor([[[0.0, 4.0], [0.0, 5.0]]])  # squared errors 9 and 0
    assert float(feature_distill_loss(student, teacher)) == pytest.approx(4.5 / 25)
    with pytest.raises(ValueError, match="same grid"):
        feature_distill_loss(torch.zeros(1, 3, 2), teacher)


def test_teacher_gives_the_tokens_its_language_model_reads(teacher):
    from mmtok.testbed.curriculum import image_features

    items = list(dataset("image", "train", 2, form="mixed"))
    tokens = teacher.tokens(teacher.pixels([it.media for it in items]))
    assert tokens.shape == (2, 256, teacher.hidden_size)
    # The very tensors the stock processor + forward path build for the teacher's own prompts.
    from mmtok.loading import load

    model, processor = load(LLAVA, dtype=torch.float32)
    batch = encode_items(processor, items)
    with torch.no_grad():
        assert torch.allclose(image_features(model.eval(), batch["pixel_values"]), tokens, atol=1e-5)


def test_teacher_must_be_a_llava_testbed():
    with pytest.raises(ValueError, match="Llava"):
        FeatureTeacher(ROOT / "assets" / "testbed-audio")


def test_output_layer_fit_is_the_least_squares_optimum(teacher):
    spec = get_spec("testbed-qwen2vl")
    model, processor = spec.build("full", seed=0)
    items = list(dataset("image", "train", 6, form="mixed"))
    fit = fit_output_layer(model, processor, teacher, items, ridge=1e-9)
    assert fit["after"] < 0.5 * fit["before"]
    # At the optimum the loss has no gradient along the fitted layer's weights.
    layer = model.model.visual.merger.mlp[-1]
    batch = encode_items(processor, items)
    target = teacher.tokens(teacher.pixels([it.media for it in items]))
    loss = feature_distill_loss(grid_inputs(model, batch).tokens["image"], target)
    weight_grad, = torch.autograd.grad(loss, [layer.weight])
    assert float(loss.detach()) == pytest.approx(fit["after"], rel=1e-4)
    assert float(weight_grad.norm()) < 1e-3 * float(layer.weight.detach().norm())
    with pytest.raises(ValueError, match="Qwen2-VL"):
        fit_output_layer(teacher.model, processor, teacher, items)


def test_training_batches_carry_the_teacher_pixels_of_their_images(teacher):
    spec = get_spec("testbed-qwen2vl")
    _, processor = spec.build("tiny", seed=0)
    batches = StepBatches(spec, processor, 4, 0, 0, 1, modalities=["image"], teacher_pixels=teacher.pixels)
    batch = batches[0]
    assert batch["teacher_pixel_values"].shape == (4, 3, 336, 336)
    assert "pixel_values_videos" not in batch  # images only


def test_distillation_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="subset"):
        train("testbed-qwen2vl", size="tiny", steps=1, modalities=["audio"], work_dir=tmp_path)
    with pytest.raises(ValueError, match="train on images"):
        train("testbed-qwen2vl", size="tiny", steps=1, modalities=["video"], distill_from=LLAVA, work_dir=tmp_path)
    with pytest.raises(ValueError, match="dense_weight"):
        train("testbed-qwen2vl", size="tiny", steps=1, distill_from=LLAVA, work_dir=tmp_path, log=lambda _: None)


@pytest.mark.slow
def test_first_step_distillation_loss_is_that_of_the_fitted_model(tmp_path, teacher):
    spec = get_spec("testbed-qwen2vl")
    train("testbed-qwen2vl", steps=1, batch_size=2, modalities=["image"], distill_from=LLAVA, work_dir=tmp_path,
          eval_every=0, attention_weight=0.0, log=lambda _: None)
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["distill_loss"]
    model, processor = spec.build("full", seed=0)
    fit_output_layer(model, processor, teacher, list(dataset("image", "train", FIT_ITEMS, 1, form="mixed")))
    batch = StepBatches(spec, processor, 2, 0, 0, 1, dense=True, modalities=["image"],
                        teacher_pixels=teacher.pixels)[0]
    with torch.no_grad():
        expected = feature_distill_loss(grid_inputs(model, {k: v for k, v in batch.items()
                                                            if not k.startswith(("dense", "teacher"))}
                                                    ).tokens["image"], teacher.tokens(batch["teacher_pixel_values"]))
    assert logged == pytest.approx(float(expected), abs=2e-4)


def test_stage_table_names_what_each_stage_took_from_elsewhere():
    from mmtok.testbed.card import lineage_rows, stage

    base = {"steps": 10, "batch_size": 8, "lr": 1e-3, "dense_weight": 1.0, "curriculum": 0.0,
            "attention_weight": 1.0, "position_code": 0.0}
    first = {"settings": {**base, "init_lm_from": "assets/testbed-llava"}, "step": 10,
             "history": {"seconds": 60.0, "hardware": "one H200 GPU"}}
    settings = {**base, "distill_from": "assets/testbed-llava", "distill_weight": 1.0, "modalities": ["image"],
                "position_homotopy": 0.6, "time_weight": 0.5, "motion_weight": 0.25, "appearance_weight": 0.5,
                "balanced_probe": True,
                "init_from": {"lineage": [stage(first)]}}
    rows = lineage_rows(settings, {"losses": [0.0] * 4, "seconds": 30.0}, "x86_64 CPU (2 threads)")
    assert rows[-2].endswith("| language model from `assets/testbed-llava` |")
    assert rows[-1].endswith("| image tokens distilled from `assets/testbed-llava` (weight 1.0); image only; positions 1-D -> M-RoPE over 60% of the steps; video time read-out (weight 0.5); "
                            "video motion read-out (weight 0.25); video appearance read-out (weight 0.5); "
                            "class-balanced read-outs |")
    from mmtok.testbed.card import stage_sources

    later = stage_sources({**base, "appearance_weight": 1.0, "appearance_layer": 2})
    assert later == "video appearance read-out (weight 1.0, after layer 2)"
    assert stage_sources({**base, "position_ramp": True, "family_mix": {"relation": 3}}) \
        == "position ramp; family mix relation=3"
    assert stage_sources({**base, "attention_layers": [1, 2]}) == "attention supervision on layers 1 and 2"
    assert stage_sources({**base, "swap_marks": True}) == "swap marks"
    assert stage_sources({**base, "relation_every_word": True}) == "every relation answer word attends"
    assert stage_sources({**base, "lookalike_marks": True}) == "look-alike marks"
    from mmtok.testbed.card import _layers_flag

    assert _layers_flag({"relevance_layers": [1, 2]}, "relevance_layers", "relevance marks after layers") \
        == ", relevance marks after layers 1 and 2 (`--relevance-layers 1,2`)"
    assert _layers_flag({}, "attention_layers", "attention supervision on layers") == ""
