"""The quality table (`mmtok testbed report`): cells, kept tokens, the page's numbers, resume, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.compressors import compressor_class, list_compressors  # noqa: E402
from mmtok.testbed import quality_page as page  # noqa: E402
from mmtok.testbed import report as rep  # noqa: E402
from mmtok.testbed.evaluate import FamilyScore, Report, evaluate, heldout  # noqa: E402
from mmtok.testbed.models import get_spec  # noqa: E402

BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
# The tiny testbed model has 16 visual tokens per image (56 px / 14 px patches): round-half-up of budget x 16.
KEPT_OF_16 = {1.0: 16, 0.5: 8, 0.25: 4, 0.1: 2, 0.05: 1}
METHODS = ["random", "divprune", "tome", "dymu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    model, processor = get_spec("testbed-llava").build("tiny", seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def run(tiny):
    model, processor = tiny
    return rep.quality_report(model, processor, methods=METHODS, budgets=BUDGETS, n_per_family=1,
                              model_name="tiny")


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading``."""
    lines = markdown.split(heading, 1)[1].splitlines()
    rows = [ln for ln in lines if ln.startswith("|")]
    start = lines.index(rows[0])
    body = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split("|")])
    return body[2:]


# ---------------------------------------------------------------------- a real run on the tiny model


def test_every_method_and_budget_has_a_cell_and_a_row(run):
    assert run.methods == ["identity", *METHODS]
    assert run.budgets == BUDGETS
    assert set(run.reports) == {("identity", 1.0)} | {(m, b) for m in METHODS for b in BUDGETS}
    rows = _table_rows(page.format_quality(run), "## Every cell")
    assert [(r[0], r[2]) for r in rows] == [("identity", "100 %")] + [(m, page.pct(b)) for m in METHODS for b in BUDGETS]
    summary = _table_rows(page.format_quality(run), "## % of full accuracy")
    assert [r[0] for r in summary] == ["identity", *METHODS]
    assert all(len(r) == 2 + len(BUDGETS) for r in summary)


def test_kept_tokens_are_the_budget_of_16_tokens(run):
    n_items = 8  # one held-out item per image family
    for (method, budget), report in run.reports.items():
        assert report.visual_before == [16] * n_items
        if compressor_class(method).adaptive:  # dymu's budget is a ceiling
            assert all(1 <= k <= KEPT_OF_16[budget] for k in report.visual_after)
        else:
            assert report.visual_after == [KEPT_OF_16[budget]] * n_items, (method, budget)
    rows = {(r[0], r[2]): r[3] for r in _table_rows(page.format_quality(run), "## Every cell")}
    assert rows[("random", "10 %")] == "2" and rows[("tome", "25 %")] == "4" and rows[("identity", "100 %")] == "16"


def test_identity_reference_equals_evaluate(tiny, run):
    model, processor = tiny
    direct = evaluate(model, processor, heldout(("image",), 1, 0), method="identity", budget=1.0)
    assert run.reference.scores == direct.scores
    assert run.reference.visual_after == direct.visual_after == [16] * 8


def test_default_methods_are_the_registered_image_ones_that_fit(tiny):
    model, processor = tiny
    image = list_compressors(modality="image")
    assert rep.applicable_methods(("image",)) == image
    out = rep.quality_report(model, processor, budgets=(0.5,), n_per_family=1)
    # the tiny LM has one layer: the in-LLM methods have no layer to drop at
    assert out.skipped == ["fastv", "pdrop", "sparsevlm"]
    assert out.methods == ["identity", *[m for m in image if m not in out.skipped and m != "identity"]]
    assert "fastv: cannot run on this 1-layer language model" in page.format_quality(out)


def test_fit_options_known_answers():
    assert rep.fit_options("fastv", 32) == {} and rep.fit_options("pdrop", 32) == {}
    assert rep.fit_options("sparsevlm", 32) == {} and rep.fit_options("random", 1) == {}
    assert rep.fit_options("fastv", 3) == {}  # K = 2 fits three layers
    assert rep.fit_options("pdrop", 3) == {"layers": (1, 2)}
    assert rep.fit_options("sparsevlm", 3) == {"layers": (0, 1)}
    assert rep.fit_options("fastv", 2) == {"layer": 1}
    for name in ("fastv", "pdrop", "sparsevlm"):
        assert rep.fit_options(name, 1) is None
    assert rep.fit_options("pdrop", 3, {"layers": (1,)}) == {"layers": (1,)}
    assert rep.fit_options("pdrop", 3, {"layers": (1, 5)}) is None


# ---------------------------------------------------------------------- the page's numbers on hand-made reports


def _report(method: str, budget: float, correct: dict[str, int], kept: int) -> Report:
    scores = [FamilyScore(f, "image", c, 10, 0.25) for f, c in correct.items()]
    return Report(method, budget, "mixed", scores, 1.0, [100] * 40, [kept] * 40)


def _fake_run(with_random_10: bool = True) -> rep.QualityRun:
    full = _report("identity", 1.0, {"a": 8, "b": 6, "c": 10, "d": 4}, 100)  # mean 0.7
    reports = {
        ("identity", 1.0): full,
        ("random", 0.5): _report("random", 0.5, {"a": 8, "b": 6, "c": 9, "d": 4}, 50),  # 0.675
        ("pool", 0.5): _report("pool", 0.5, {"a": 8, "b": 6, "c": 8, "d": 4}, 50),  # 0.65
        ("pool", 0.1): _report("pool", 0.1, {"a": 7, "b": 6, "c": 8, "d": 3}, 10),  # 0.6
    }
    if with_random_10:
        reports[("random", 0.1)] = _report("random", 0.1, {"a": 6, "b": 5, "c": 8, "d": 2}, 10)  # 0.525
    return rep.QualityRun(model="fake", architecture="Fake", reference=full, reports=reports,
                          methods=["identity", "random", "pool"], budgets=(0.5, 0.1),
                          stages={"identity": "pre_llm", "random": "pre_llm", "pool": "pre_llm"},
                          notes={"pool": "pool: a note"}, n_per_family=10)


def test_percent_of_full_and_the_random_check_on_known_numbers():
    assert page.of_full(0.525, 0.7) == "75.0"
    assert page.of_full(0.6, 0.7) == "85.7"
    assert page.of_full(0.5, 0.0) == "-"
    assert page.pct(0.05) == "5 %" and page.pct(1.0) == "100 %"
    run = _fake_run()
    text = page.format_quality(run, command="mmtok testbed report fake", plot="quality.png")
    assert "**70.0 %**" in text and "chance: 25.0 %" in text and "= 40 items" in text
    assert "Rerun: `mmtok testbed report fake`" in text and "](quality.png)" in text
    summary = {r[0]: r[2:] for r in _table_rows(text, "## % of full accuracy")}
    assert summary == {"identity": ["", ""], "random": ["**96.4**", "75.0"], "pool": ["92.9", "**85.7**"]}
    cells = _table_rows(text, "## Every cell")
    assert cells == [
        ["identity", "pre_llm", "100 %", "100", "70.0", "100.0"],
        ["random", "pre_llm", "50 %", "50", "67.5", "96.4"],
        ["random", "pre_llm", "10 %", "10", "52.5", "75.0"],
        ["pool", "pre_llm", "50 %", "50", "65.0", "92.9"],
        ["pool", "pre_llm", "10 %", "10", "60.0", "85.7"],
    ]
    fam = {r[0]: r[1:] for r in _table_rows(text, "## Per family at 10 %")}
    assert fam["full (identity @ 100 %)"] == ["80.0", "60.0", "100.0", "40.0", "70.0"]
    assert fam["random"] == ["60.0", "50.0", "80.0", "20.0", "52.5"]
    assert fam["chance"] == ["25.0"] * 5
    lost, drops = page.random_check(run)
    assert lost == ["a", "c", "d"] and drops == pytest.approx({"a": 20.0, "b": 10.0, "c": 20.0, "d": 20.0})
    assert "**3 of 4** families (a, c, d): **met**" in text
    check = _table_rows(text, "## Check:")
    assert check[1] == ["b", "60.0", "50.0", "10.0", "no"] and check[0][-1] == "yes"
    assert "- pool: a note" in text


def test_the_page_names_each_media_size_of_a_mixed_model():
    run = _fake_run()
    assert "(Fake, 100 visual tokens per item)" in page.format_quality(run)
    run.reference.visual_before[:] = [256] * 30 + [1152] * 10  # 30 images, 10 videos
    assert "(Fake, 256 to 1152 (mean 480) visual tokens per item)" in page.format_quality(run)


def test_random_check_not_met_and_not_computed():
    run = _fake_run()
    run.reports[("random", 0.1)] = _report("random", 0.1, {"a": 6, "b": 6, "c": 10, "d": 4}, 10)  # only a drops 20
    assert "**1 of 4** families (a): **NOT met**" in page.format_quality(run)
    missing = _fake_run(with_random_10=False)
    assert page.random_check(missing) is None
    assert "Not computed: `random` at 10 % was not run." in page.format_quality(missing)


# ---------------------------------------------------------------------- resume, atomic writes, the plot


def _counting(monkeypatch, fail_at: int | None = None) -> list[str]:
    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(f"{kwargs['method']}@{kwargs['budget']}")
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("simulated crash")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(rep, "evaluate", counted)
    return calls


def test_resume_skips_finished_cells(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    cache = tmp_path / "work.jsonl"
    kw = dict(methods=["random"], budgets=(0.5, 0.1), n_per_family=1, cache=cache)
    calls = _counting(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rep.quality_report(model, processor, **kw)
    assert calls == ["identity@1.0", "random@0.5", "random@0.1"]
    assert len(cache.read_text().splitlines()) == 2
    with cache.open("a") as f:
        f.write('{"key": "cut short')  # a line a crash left half written is ignored
    calls = _counting(monkeypatch)
    first = rep.quality_report(model, processor, **kw)
    assert calls == ["random@0.1"]  # only the unfinished cell
    calls = _counting(monkeypatch)
    again = rep.quality_report(model, processor, **kw)
    assert calls == []
    assert {k: (r.scores, r.visual_after) for k, r in again.reports.items()} == {
        k: (r.scores, r.visual_after) for k, r in first.reports.items()}
    rep.quality_report(model, processor, **{**kw, "batch_size": 4})  # another batch size is another run
    assert calls == ["identity@1.0", "random@0.5", "random@0.1"]


def test_write_is_atomic_and_the_plot_is_a_png(tmp_path, monkeypatch):
    out = tmp_path / "docs" / "quality.md"
    md, png = page.write_quality(_fake_run(), out, command="cmd")
    assert md == out and png == tmp_path / "docs" / "quality.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    assert "![accuracy against visual tokens kept](quality.png)" in md.read_text()
    old_md, old_png = md.read_text(), png.read_bytes()

    def broken(run, path):
        open(path, "wb").write(PNG_MAGIC)  # half a file, then the failure
        raise RuntimeError("plot failed")

    monkeypatch.setattr(page, "plot_quality", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        page.write_quality(_fake_run(with_random_10=False), out)
    assert md.read_text() == old_md and png.read_bytes() == old_png
    assert sorted(p.name for p in out.parent.iterdir()) == ["quality.md", "quality.png"]


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("budgets", [(0.0,), (1.5,), (-0.1,), (True,), (), ("0.5",)])
def test_bad_budgets(tiny, budgets):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rep.quality_report(*tiny, methods=["random"], budgets=budgets, n_per_family=1)


def test_bad_inputs_name_what_is_allowed(tiny, monkeypatch):
    calls = _counting(monkeypatch)
    with pytest.raises(ValueError, match="n_per_family must be an int >= 1"):
        rep.quality_report(*tiny, methods=["random"], n_per_family=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        rep.quality_report(*tiny, methods=["random"], n_per_family=1, batch_size=0)
    with pytest.raises(ValueError, match="unknown compressor 'nope'; valid names: .*random"):
        rep.quality_report(*tiny, methods=["nope"], n_per_family=1)
    with pytest.raises(ValueError, match="fastv: cannot run on this 1-layer language model"):
        rep.quality_report(*tiny, methods=["fastv"], n_per_family=1)
    with pytest.raises(ValueError, match="options given for 'tome', which is not among the methods run"):
        rep.quality_report(*tiny, methods=["random"], n_per_family=1, options={"tome": {}})
    with pytest.raises(ValueError, match="has no option"):
        rep.quality_report(*tiny, methods=["random"], n_per_family=1, options={"random": {"nope": 1}})
    with pytest.raises(ValueError, match="does not take audio"):
        rep.quality_report(*tiny, methods=["divprune"], n_per_family=1, modalities=("audio",))
    assert calls == []  # every check runs before any evaluation


# ---------------------------------------------------------------------- the command line


def test_cli_report_on_a_model_directory(tiny, tmp_path, capsys):
    from mmtok.cli import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "docs" / "quality.md"
    argv = ["testbed", "report", "--model-dir", str(tmp_path / "model"), "--n", "1", "--methods", "random",
            "--budgets", "1", "0.1", "--out", str(out), "--work", str(tmp_path / "w.jsonl")]
    assert main(argv) == 0
    text = out.read_text()
    rows = _table_rows(text, "## Every cell")
    assert [(r[0], r[2], r[3]) for r in rows] == [("identity", "100 %", "16"), ("random", "100 %", "16"),
                                                  ("random", "10 %", "2")]
    assert "Rerun: `mmtok testbed report testbed-llava --model-dir" in text
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert len((tmp_path / "w.jsonl").read_text().splitlines()) == 3
    assert "[3/3] random @ 0.1" in capsys.readouterr().out
    assert main(argv) == 0  # everything cached
    assert "cached" in capsys.readouterr().out


def test_cli_missing_testbed_model_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    import mmtok.api
    from mmtok.cli import main

    monkeypatch.setattr(mmtok.api, "ROOT", tmp_path)
    assert main(["testbed", "report", "--out", str(tmp_path / "q.md")]) == 2
    err = capsys.readouterr().err
    assert "mmtok testbed train testbed-llava" in err and "mmtok testbed export testbed-llava" in err
    assert "--model-dir" in err and not (tmp_path / "q.md").exists()


def test_parse_options():
    from mmtok.commands.testbed import parse_options

    assert parse_options(["pdrop.layers=[1,2]", "fastv.layer=1", "tome.mode=mean"]) == {
        "pdrop": {"layers": (1, 2)}, "fastv": {"layer": 1}, "tome": {"mode": "mean"}}
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_options(["pdrop=1"])
    assert json.loads(json.dumps(rep.report_to_dict(_report("x", 0.5, {"a": 1}, 3))))["visual_after"] == [3] * 40


def test_device_option_names_what_is_allowed():
    import torch

    from mmtok.commands.testbed import model_device

    assert model_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(ValueError, match="cpu or cuda"):
            model_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="0 CUDA devices"):
            model_device("cuda")
