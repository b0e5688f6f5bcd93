"""A run and its warm-started stages as one command: the same weights as the commands run by hand."""

import json

import pytest
import torch

import mmtok.testbed.train as training
from mmtok.cli import main
from mmtok.testbed.models import LLAVA_STAGE, get_spec
from mmtok.testbed.stages import spec_stages, stage_dir, train_with_stages

TINY = dict(size="tiny", seed=0)
COMMON = dict(batch_size=8, lr=5e-3, warmup=0)
QUIET = dict(eval_every=0, log=lambda s: None)


def test_chain_equals_the_commands_run_one_after_another(tmp_path):
    chain = train_with_stages("testbed-llava", [dict(steps=1, **COMMON)], work_dir=tmp_path / "chain",
                              out=tmp_path / "export", common={"eval_every": 0, "eval_n": 1}, log=lambda s: None,
                              steps=2, **COMMON, **TINY)
    first = training.train("testbed-llava", steps=2, work_dir=tmp_path / "a", **COMMON, **TINY, **QUIET)
    second = training.train("testbed-llava", steps=1, work_dir=tmp_path / "b", init_from=tmp_path / "a",
                            **COMMON, **TINY, **QUIET)
    for (name, a), b in zip(chain["model"].state_dict().items(), second["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert chain["losses"] == second["losses"] and len(first["losses"]) == 2
    warm = chain["settings"]["init_from"]
    assert warm["path"] == str(tmp_path / "chain" / "checkpoint.pt") and warm["items"] == 2 * 8
    assert [s["step"] for s in warm["lineage"]] == [2]
    assert (stage_dir(tmp_path / "chain", 1) / "checkpoint.pt").is_file()
    # only the last run exports: the shipped record is the stage's, with the first run in its lineage
    record = json.loads((tmp_path / "export" / "training.json").read_text())
    assert record["step"] == 1 and [s["step"] for s in record["settings"]["init_from"]["lineage"]] == [2]

    # resumed, every finished run is loaded and left as it is
    again = train_with_stages("testbed-llava", [dict(steps=1, **COMMON)], work_dir=tmp_path / "chain",
                              resume=True, common={"eval_every": 0}, log=lambda s: None, steps=2, **COMMON, **TINY)
    assert again["losses"] == chain["losses"]
    for (name, a), b in zip(chain["model"].state_dict().items(), again["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_chain_resumes_a_stage_stopped_part_way(tmp_path, monkeypatch):
    whole = train_with_stages("testbed-llava", [dict(steps=3, **COMMON)], work_dir=tmp_path / "whole",
                              common={"eval_every": 0}, log=lambda s: None, steps=1, **COMMON, **TINY)
    original = training.train

    def stop_stage_early(name, **kw):  # a chain killed after the stage's first step
        return original(name, **kw, until=1) if "init_from" in kw else original(name, **kw)

    monkeypatch.setattr(training, "train", stop_stage_early)
    train_with_stages("testbed-llava", [dict(steps=3, **COMMON)], work_dir=tmp_path / "cut",
                      common={"eval_every": 0}, log=lambda s: None, steps=1, **COMMON, **TINY)
    monkeypatch.setattr(training, "train", original)
    resumed = train_with_stages("testbed-llava", [dict(steps=3, **COMMON)], work_dir=tmp_path / "cut", resume=True,
                                common={"eval_every": 0}, log=lambda s: None, steps=1, **COMMON, **TINY)
    assert resumed["losses"] == whole["losses"] and len(resumed["losses"]) == 3


def test_chain_wiring_directories_exports_and_shared_arguments(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", lambda name, **kw: calls.append(kw) or {"step": len(calls)})
    stages = [{"steps": 5, "lr": 1e-4}, {"steps": 7, "relation_every_word": True}]
    train_with_stages("testbed-llava", stages, work_dir=tmp_path, out="OUT", resume=True, seed=3,
                      common={"threads": 2, "eval_n": 4}, log=print, steps=100, family_mix={"count": 2})
    assert [c["work_dir"] for c in calls] == [tmp_path, tmp_path / "stage-1", tmp_path / "stage-2"]
    assert [c.get("init_from") for c in calls] == [None, tmp_path, tmp_path / "stage-1"]
    assert [c["out"] for c in calls] == [None, None, "OUT"]
    assert [c["steps"] for c in calls] == [100, 5, 7]
    assert all(c["resume"] and c["seed"] == 3 and c["threads"] == 2 and c["eval_n"] == 4 for c in calls)
    assert "family_mix" in calls[0] and all("family_mix" not in c for c in calls[1:])
    assert calls[2]["relation_every_word"] and "relation_every_word" not in calls[1]
    # no stages: exactly one train() call, which exports
    calls.clear()
    train_with_stages("testbed-llava", [], work_dir=tmp_path, out="OUT", steps=9)
    assert len(calls) == 1 and calls[0]["out"] == "OUT" and calls[0]["steps"] == 9
    # no work_dir: train()'s own default, and the stages beneath it
    calls.clear()
    train_with_stages("testbed-llava", [{"steps": 1}])
    assert [c["work_dir"] for c in calls] == [training.default_work_dir("testbed-llava"),
                                              training.default_work_dir("testbed-llava") / "stage-1"]


@pytest.mark.parametrize(("stages", "first", "match"), [
    ([{"work_dir": "x"}], {}, "stage 1 names \\['work_dir'\\]"),
    ([{"steps": 1}, {"init_from": "x", "until": 2}], {}, "stage 2 names \\['init_from', 'until'\\]"),
    ([{"steps": 1}], {"until": 3}, "until stops one run part-way"),
    ([], {"common": {"seed": 1}}, "common names \\['seed'\\]"),
])
def test_chain_refuses_arguments_it_sets_itself(tmp_path, stages, first, match):
    with pytest.raises(ValueError, match=match):
        train_with_stages("testbed-llava", stages, work_dir=tmp_path, **first)


def test_spec_stage_recipes():
    assert spec_stages("testbed-llava", 3) == [LLAVA_STAGE] * 3 and spec_stages("testbed-llava", 0) == []
    first = spec_stages("testbed-llava", 1)[0]
    first["steps"] = 1  # a copy, nested dicts too: the spec keeps its recipe
    first["family_mix"]["count"] = 9
    assert get_spec("testbed-llava").stage_recipe[0]["steps"] == 900
    assert get_spec("testbed-llava").stage_recipe[0]["family_mix"]["count"] == 2
    with pytest.raises(ValueError, match="has 3 stages: stages must be in 0 .. 3, got 4"):
        spec_stages("testbed-llava", 4)
    with pytest.raises(ValueError, match="in 0 .. 3, got -1"):
        spec_stages("testbed-llava", -1)
    with pytest.raises(ValueError, match="testbed-audio has no stage recipe: stages must be 0, got 1"):
        spec_stages("testbed-audio", 1)


def test_cli_stages_run_the_spec_recipe_after_the_run(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(training, "train", lambda name, **kw: calls.append(kw) or {})
    monkeypatch.setattr("mmtok.testbed.allocator.keep_freed_memory", lambda: False)
    assert main(["testbed", "train", "testbed-llava", "--stages", "2", "--work-dir", "/tmp/w", "--steps", "50",
                 "--eval-n", "3"]) == 0
    assert [str(c["work_dir"]) for c in calls] == ["/tmp/w", "/tmp/w/stage-1", "/tmp/w/stage-2"]
    assert calls[0]["steps"] == 50 and [c["steps"] for c in calls[1:]] == [900, 900]
    assert all(c["relation_every_word"] for c in calls[1:]) and calls[0]["relation_every_word"] is False
    assert all(c["eval_n"] == 3 for c in calls) and str(calls[2]["out"]).endswith("assets/testbed-llava")
    calls.clear()
    assert main(["testbed", "train", "testbed-audio", "--stages", "1"]) != 0
    assert "testbed-audio has no stage recipe" in capsys.readouterr().err and not calls
