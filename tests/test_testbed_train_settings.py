"""A training run's settings (`mmtok.testbed.train_settings`): the spec's defaults, keys only when on, checks."""

import pytest

from mmtok.testbed.models import get_spec
from mmtok.testbed.train_settings import recipe_defaults, run_settings

OFF = {"steps": None, "batch_size": None, "lr": None, "warmup": None, "weight_decay": None, "init_from": None,
       "dense_weight": None, "curriculum": None, "attention_weight": None, "position_code": None,
       "init_lm_from": None, "distill_from": None, "distill_weight": 1.0, "modalities": None,
       "position_homotopy": 0.0, "time_weight": 0.0, "motion_weight": 0.0, "appearance_weight": 0.0,
       "appearance_layer": 1, "attention_layers": None, "relevance_layers": None, "balanced_probe": False, "swap_marks": False, "position_ramp": None,
       "family_mix": None, "relation_every_word": False, "lookalike_marks": False}


def _settings(name="testbed-llava", size="full", on_grid=True, **changes):
    spec = get_spec(name)
    settings, warm = run_settings(spec, size=size, seed=3, **{**OFF, **changes})
    recipe_defaults(settings, spec, on_grid)
    return settings, warm


def test_a_fresh_shipped_size_run_takes_the_specs_whole_recipe():
    settings, warm = _settings()
    assert warm is None
    assert settings == {"name": "testbed-llava", "size": "full", "seed": 3, "steps": 6600, "batch_size": 32,
                        "lr": 2e-3, "warmup": 100, "weight_decay": 0.01, "form": "mixed", "dense_weight": 1.0,
                        "curriculum": 0.0, "attention_weight": 1.0, "position_code": 3.0, "position_ramp": True,
                        "attention_layers": [1, 2], "family_mix": {"count": 2, "read": 2, "relation": 2}}


def test_a_run_from_scratch_can_turn_the_specs_recipe_options_off_or_change_them():
    off, _ = _settings(position_ramp=False, attention_layers=[1], family_mix={})
    assert not set(off) & {"position_ramp", "attention_layers", "family_mix"}
    changed, _ = _settings(attention_layers=[2], family_mix={"count": 3})
    assert (changed["attention_layers"], changed["family_mix"], changed["position_ramp"]) == ([2], {"count": 3}, True)
    no_attention, _ = _settings(attention_weight=0.0)
    assert "attention_layers" not in no_attention and no_attention["family_mix"] == {"count": 2, "read": 2,
                                                                                     "relation": 2}


def test_other_sizes_and_models_off_the_grid_train_with_the_answer_loss_unless_asked():
    recipe = {"position_ramp", "attention_layers", "family_mix"}
    tiny, _ = _settings(size="tiny", on_grid=False)
    assert (tiny["dense_weight"], tiny["curriculum"], tiny["attention_weight"], tiny["position_code"]) == (0, 0, 0, 0)
    asked, _ = _settings(size="tiny", on_grid=False, dense_weight=0.5)
    assert (asked["dense_weight"], asked["curriculum"], asked["attention_weight"]) == (0.5, 0.0, 1.0)
    off_grid, _ = _settings(on_grid=False)
    assert (off_grid["dense_weight"], off_grid["curriculum"]) == (0.0, 0.0)
    assert not (set(tiny) | set(asked) | set(off_grid)) & recipe


def test_options_that_are_off_leave_no_key_and_those_on_are_recorded():
    plain, _ = _settings("testbed-qwen2vl")
    on, _ = _settings("testbed-qwen2vl", time_weight=0.5, motion_weight=1, appearance_weight=1, appearance_layer=2,
                      position_ramp=True, balanced_probe=True, position_homotopy=0.25, modalities=["video", "image"],
                      family_mix={"count": 2}, swap_marks=True, relevance_layers=[1, 2],
                      family_mix_from=[(500, {"direction": 2})], relation_every_word=True,
                      lookalike_marks=True)
    assert {k: on[k] for k in set(on) - set(plain)} == {
        "time_weight": 0.5, "motion_weight": 1.0, "appearance_weight": 1.0, "appearance_layer": 2,
        "position_ramp": True, "balanced_probe": True, "position_homotopy": 0.25,
        "modalities": ["image", "video"], "family_mix": {"count": 2}, "swap_marks": True,
        "relevance_layers": [1, 2], "family_mix_from": [[500, {"direction": 2}]], "relation_every_word": True,
        "lookalike_marks": True}
    assert plain["curriculum"] == 0.0 and "position_code" in plain and plain["position_code"] == 0.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"appearance_layer": 2}, "appearance_layer places"),
    ({"modalities": ["audio"]}, "trains on"),
    ({"modalities": []}, "trains on"),
    ({"modalities": ["video"], "position_ramp": True}, "train on images"),
    ({"modalities": ["video"], "distill_from": "assets/testbed-llava"}, "train on images"),
    ({"position_homotopy": 1.5}, "homotopy"),
    ({"steps": -1}, "steps and batch_size"),
    ({"dense_weight": 0.0, "attention_weight": 1.0}, "attention supervision needs"),
    ({"dense_weight": 0.0, "curriculum": 0.4, "attention_weight": 0.0}, "curriculum needs"),
    ({"dense_weight": 0.0, "attention_weight": 0.0, "swap_marks": True, "relevance_layers": [1, 2]}, "swap marks"),
    ({"modalities": ["video"], "swap_marks": True, "relevance_layers": [1, 2]}, "swap marks"),
    ({"swap_marks": True}, "swap marks"),  # the first layer's marks cannot bind: a later layer is needed
    ({"attention_weight": 0.0, "relation_every_word": True}, "relation_every_word"),
    ({"modalities": ["video"], "relation_every_word": True}, "relation_every_word"),
    ({"dense_weight": 0.0, "attention_weight": 0.0, "lookalike_marks": True}, "lookalike_marks"),
    ({"modalities": ["video"], "lookalike_marks": True}, "lookalike_marks"),
])
def test_bad_combinations_are_refused_before_the_model_is_built(changes, message):
    with pytest.raises(ValueError, match=message):
        _settings("testbed-qwen2vl", **changes)


def test_a_warm_start_continues_the_data_and_lineage_without_the_curriculum_or_a_new_position_code():
    settings, warm = _settings(init_from="assets/testbed-llava")
    assert warm is not None and settings["init_from"]["step"] == warm["step"]
    assert settings["init_from"]["items"] > 400_000  # the shipped lineage's items, so no item is drawn twice
    assert settings["init_from"]["lineage"][-1]["steps"] == warm["settings"]["steps"]
    assert (settings["curriculum"], settings["position_code"], settings["dense_weight"]) == (0.0, 0.0, 1.0)
    assert not set(settings) & {"position_ramp", "attention_layers", "family_mix"}  # a stage names what it adds
