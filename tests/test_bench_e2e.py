"""``mmtok bench e2e`` machinery on the tiny builds of the benchmark models (same code path, toy sizes)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mmtok.bench import e2e, e2e_models
from mmtok.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: thread start-up and contention on a shared 2-core machine cost more than the work.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rec(media, method, budget, prefill, encode=1.0, compress=0.0, stage="pre_llm"):
    t = {"prepare": 0.0, "encode": encode, "compress": compress, "prefill": prefill, "decode": 0.0, "total": 0.0}
    return {
        "media": media, "method": method, "stage": stage, "budget": budget, "timings_s": t, "load_avg_1min": [0.0],
    }


def test_goal_checks_known_answers():
    results = [
        rec("video", "identity", 1.0, prefill=10.0, encode=50.0),
        rec("image", "identity", 1.0, prefill=2.0),
        rec("video", "a", 0.1, prefill=1.5, encode=50.5, compress=0.2, stage="vision"),
        rec("video", "a", 0.5, prefill=5.0, compress=9.0),  # another budget: ignored
        rec("image", "b", 0.1, prefill=0.1, compress=9.0),  # another medium: ignored
        rec("video", "b", 0.1, prefill=3.0, encode=49.0, compress=0.35),
        rec("video", "c", 0.1, prefill=11.0, compress=0.1),
        {"media": "video", "method": "d", "budget": 0.1, "error": "RuntimeError: boom"},
    ]
    g = e2e.goal_checks(results)
    assert set(g["methods"]) == {"a", "b", "c", "d"}
    a, b, c, d = (g["methods"][k] for k in "abcd")
    assert a["prefill_ratio"] == pytest.approx(0.15) and a["prefill_ratio_met"]
    assert a["saved_s"] == pytest.approx(8.5)
    assert a["compress_share"] == pytest.approx(0.2 / 8.5) and a["compress_share_met"]
    assert a["encode_extra_s"] == pytest.approx(0.5)
    assert a["compress_share_with_signals"] == pytest.approx(0.7 / 8.5)
    assert a["met"] and a["stage"] == "vision"
    assert b["prefill_ratio"] == pytest.approx(0.3) and not b["prefill_ratio_met"]
    assert b["compress_share"] == pytest.approx(0.05) and b["compress_share_met"]  # the bound is inclusive
    assert b["encode_extra_s"] == 0.0 and not b["met"]
    assert c["saved_s"] == pytest.approx(-1.0) and c["compress_share"] is None and not c["compress_share_met"]
    assert d == {"error": "RuntimeError: boom", "met": False}
    assert g["met_by"] == ["a"] and g["all_met"] is False
    assert g["full_prefill_s"] == 10.0 and g["prefill_ratio_max"] == 0.2 and g["compress_share_max"] == 0.05
    with pytest.raises(ValueError, match="identity"):
        e2e.goal_checks([r for r in results if r["method"] != "identity"])


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    out.write_text("old contents")
    res = e2e.run(
        "onevision-0.5b", methods=["divprune", "visionzip"], budgets=(1.0, 0.1), tiny=True, warmup=False,
        max_new_tokens=2, out_path=out,
    )
    return res, out


def test_tiny_run_report_and_atomic_write(tiny_report):
    res, out = tiny_report
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))  # the whole report, replaced in place
    assert [p.name for p in out.parent.iterdir()] == ["e2e.json"]  # no temporary file left
    assert set(res) == {"bench", "machine", "model", "media", "settings", "results", "goals", "wall_s"}
    assert res["model"]["tiny"] and res["model"]["parameters"] > 0 and res["media"]["video"]["frames"] == 4
    runs = [(r["media"], r["method"], r["budget"]) for r in res["results"]]
    assert runs == [(m, meth, b) for m in ("image", "video") for meth, b in
                    [("identity", 1.0), ("divprune", 0.1), ("visionzip", 0.1)]]
    for r in res["results"]:
        assert set(r["timings_s"]) == {"prepare", "encode", "compress", "prefill", "decode", "total"}
        waited = sum(r["timings_s"][k] for k in ("prepare", "encode", "compress", "prefill"))
        assert r["ttft_s"] == pytest.approx(waited)
        assert r["peak_memory_bytes"] > 0 and r["runs"] == 1
        full = next(f for f in res["results"] if f["media"] == r["media"] and f["method"] == "identity")
        assert r["prefill_vs_full"] == pytest.approx(r["timings_s"]["prefill"] / full["timings_s"]["prefill"])
        # The language model saw exactly the dropped visual tokens fewer.
        dropped = r["visual_tokens"]["before"] - r["visual_tokens"]["after"]
        assert full["lm_input_tokens"] - r["lm_input_tokens"] == dropped
    video = {r["method"]: r for r in res["results"] if r["media"] == "video"}
    # 4 frames x 2x2 pooled tokens + 1 newline; 10 % of 16 rounds to 2, the newline is always kept.
    assert video["identity"]["visual_tokens"] == {"before": 17, "after": 17}
    assert video["divprune"]["visual_tokens"] == {"before": 17, "after": 3}
    assert video["visionzip"]["stage"] == "vision" and video["divprune"]["stage"] == "pre_llm"
    assert res["goals"] == json.loads(json.dumps(e2e.goal_checks(res["results"])))
    table = e2e.to_markdown(res)
    assert table.count("\n| video |") == 3 and "Goals on the video at 10%" in table


def test_failed_run_is_recorded_and_not_retried(monkeypatch):
    calls = []

    def fake(net, proc, medium, item, method, budget, repeats, new):
        calls.append((medium, method, budget))
        if method == "bad":
            raise RuntimeError("broken path")
        return rec(medium, method, budget, prefill=1.0 if method == "identity" else 0.1)

    monkeypatch.setattr(e2e, "measure", fake)
    plan = [("identity", 1.0), ("bad", 0.5), ("good", 0.5), ("bad", 0.1), ("good", 0.1)]
    failed = {("image", "good"): "ValueError: from the preflight"}
    out = e2e.sweep(None, None, {"image": 0, "video": 0}, ("image", "video"), plan, 1, 1, lambda s: None, failed)
    assert ("video", "bad", 0.1) not in calls and ("image", "good", 0.5) not in calls
    assert [c for c in calls if c[1] == "bad"] == [("image", "bad", 0.5), ("video", "bad", 0.5)]
    errors = [(r["media"], r["method"], r["budget"], r["error"]) for r in out if "error" in r]
    assert errors == [
        ("image", "bad", 0.5, "RuntimeError: broken path"), ("image", "good", 0.5, "ValueError: from the preflight"),
        ("image", "bad", 0.1, "RuntimeError: broken path"), ("image", "good", 0.1, "ValueError: from the preflight"),
        ("video", "bad", 0.5, "RuntimeError: broken path"), ("video", "bad", 0.1, "RuntimeError: broken path"),
    ]
    goals = e2e.goal_checks(out)
    assert goals["methods"]["bad"]["met"] is False and goals["met_by"] == ["good"]


def test_bad_arguments_fail_before_anything_runs(tmp_path, monkeypatch):
    out = tmp_path / "e2e.json"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="unknown methods"):
        e2e.run(methods=["nope"], tiny=True, out_path=out)
    with pytest.raises(ValueError, match="media"):
        e2e.run(media=("audio",), tiny=True, out_path=out)
    with pytest.raises(ValueError, match="budgets"):
        e2e.run(budgets=(0.5, 1.5), tiny=True, out_path=out)
    with pytest.raises(ValueError, match="threads"):
        e2e.run(threads=0, tiny=True, out_path=out)
    with pytest.raises(ValueError, match="unknown e2e model"):
        e2e_models.build("llava-7b")
    assert out.read_text() == "keep me"
    monkeypatch.setattr(e2e_models, "available_memory", lambda: 4 * 2**30)
    with pytest.raises(ValueError, match=r"qwen2.5-vl-3b needs about 1[0-9]\.\d GiB .* 4.0 GiB are available"):
        e2e_models.build("qwen2.5-vl-3b")  # counted on the meta device: nothing is allocated


def test_cli_runs_tiny_qwen(tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = main(["bench", "e2e", "--model", "qwen2.5-vl-3b", "--tiny", "--media", "video", "--methods", "divprune",
               "fastv", "--budgets", "1", "0.5", "--new-tokens", "2", "--threads", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model"]["name"] == "qwen2.5-vl-3b" and res["settings"]["repeats"] == 1
    assert res["machine"]["threads"] == 2 and torch.get_num_threads() == 1  # set for the runs, then restored
    video = {r["method"]: r for r in res["results"]}
    assert set(video) == {"identity", "divprune", "fastv"}
    full = video["identity"]
    before = full["visual_tokens"]["before"]
    for name, stage in (("divprune", "pre_llm"), ("fastv", "llm")):
        r = video[name]
        assert r["stage"] == stage and r["visual_tokens"] == {"before": before, "after": before // 2}
        assert r["lm_tokens_after"] == full["lm_tokens_after"] - (before - before // 2)
    # Pre-LLM methods shorten the LM's input; FastV gets it whole and drops inside the LM.
    assert video["divprune"]["lm_input_tokens"] == video["divprune"]["lm_tokens_after"]
    assert video["fastv"]["lm_input_tokens"] == full["lm_input_tokens"]
    assert re.search(r"\| video \| fastv +\| llm +\| 50%", capsys.readouterr().out)
