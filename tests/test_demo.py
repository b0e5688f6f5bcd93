"""``mmtok demo``: a testbed model answering held-out questions with full and compressed visual tokens."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

import mmtok

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.cli import main  # noqa: E402
from mmtok.commands.compress import model_free_methods  # noqa: E402
from mmtok.testbed import demo  # noqa: E402
from mmtok.testbed.data import families  # noqa: E402
from mmtok.testbed.evaluate import heldout  # noqa: E402

METHODS = list(demo.DEMO_METHODS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An untrained tiny testbed-llava saved like an export: 56 px / 14 px patches = 16 tokens per image.

    Three language-model layers so that fastv (which drops after layer 2) runs on it.
    """
    from mmtok.testbed.models import get_spec

    spec = get_spec("testbed-llava")
    model, processor = spec.build(dataclasses.replace(spec.sizes["tiny"], text_layers=3), seed=0)
    out = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def cells(line: str) -> list[str]:
    """A table row's cells (columns are two or more spaces apart; cells hold single spaces)."""
    return re.split(r"\s{2,}", line.strip())


def test_demo_answers_every_family_at_the_exact_budget(tiny_dir, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--budget", "0.25"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("family "))
    assert cells(lines[head])[3:] == ["identity", *[f"{m} @ 0.25 ({mmtok.create_compressor(m).stage})" for m in METHODS]]
    rows = {cells(ln)[0]: cells(ln) for ln in lines[head + 2:head + 2 + 11]}
    items = heldout(["image"], 1)
    assert [it.family for it in items] == families("image") and len(items) == 8
    for it in items:
        row = rows[it.family]
        assert row[2] == it.answer, f"{it.family}: true answer {it.answer!r} not in its row {row}"
        assert len(row) == 3 + 1 + len(METHODS)
        assert all(c.endswith(("✓", "✗")) for c in row[3:])
    # every method answered all 8 questions; the kept tokens are exactly the budget (25 % of 16 = 4)
    assert rows["visual tokens"][2:] == ["16/16", *["4/16"] * len(METHODS)]
    acc = rows["accuracy"][1:]
    assert len(acc) == 1 + len(METHODS) and all(re.fullmatch(r"\d/8 \(\d+ %\)", a) for a in acc)
    for j, a in enumerate(acc):  # the accuracy row counts the marks of its column
        assert int(a.split("/")[0]) == sum(rows[it.family][3 + j].endswith("✓") for it in items)
    assert rows["prefill time"][2] == "1.00x"
    assert "576 tokens" in out  # the model-free table follows
    assert out.index("family ") < out.index("576 tokens")


def test_token_count_budget_and_n(tiny_dir, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--budget", "3", "--n", "2", "--methods", "random"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fam_rows = [cells(ln) for ln in lines if ln.split(" ")[0] in families("image")]
    assert len(fam_rows) == 16
    visual = next(cells(ln) for ln in lines if ln.startswith("visual tokens"))
    assert visual[2:] == ["16/16", "3/16"]


def test_a_method_the_model_cannot_run_is_skipped_with_its_reason(tiny_dir, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--budget", "17", "--methods", "random", "divprune"]) == 0
    out = capsys.readouterr().out
    assert "random: skipped on this model" in out and "divprune: skipped on this model" in out
    assert "larger than the 16 tokens" in out
    visual = next(cells(ln) for ln in out.splitlines() if ln.startswith("visual tokens"))
    assert visual[2:] == ["16/16"]


def test_missing_default_model_says_how_to_get_it_and_still_runs_the_model_free_table(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "mmtok testbed train testbed-llava" in out
    assert "mmtok testbed export testbed-llava" in out
    assert "family " not in out
    assert "576 tokens" in out
    firsts = {ln.split()[0] for ln in out.splitlines() if ln.strip()}
    assert set(model_free_methods()) <= firsts


@pytest.mark.parametrize("budget", ["0", "1.5", "0.0", "-3"])
def test_bad_budget_is_a_clear_error_before_anything_runs(budget, capsys):
    assert main(["demo", f"--budget={budget}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "mmtok demo: error: --budget" in captured.err


def test_bad_n_threads_and_method_are_errors(capsys):
    assert main(["demo", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--methods", "nope"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_qa_table_marks_counts_and_ratios_on_known_runs():
    items = heldout(["image"], 1)[:2]
    runs = [
        demo.MethodRun("identity", "pre_llm", 1.0, [items[0].answer, "no"], [True, False], [16, 16], [16, 16], 0.2),
        demo.MethodRun("random", "pre_llm", 0.25, ["x", items[1].answer], [False, True], [16, 16], [4, 4], 0.05),
    ]
    table = demo.qa_table(items, runs, marks=("+", "x")).splitlines()
    assert cells(table[2]) == [items[0].family, items[0].question, items[0].answer, f"{items[0].answer} +", "x x"]
    assert cells(table[3])[3:] == ["no x", f"{items[1].answer} +"]
    assert cells(table[4]) == ["accuracy", "1/2 (50 %)", "1/2 (50 %)"]
    assert cells(table[5])[2:] == ["16/16", "4/16"]
    assert cells(table[6])[2:] == ["1.00x", "0.25x"]


def test_check_budget():
    assert demo.check_budget(0.1) == 0.1 and demo.check_budget(1.0) == 1.0 and demo.check_budget(26) == 26
    for bad in (0, 0.0, 1.5, -1, True, "0.1"):
        with pytest.raises(ValueError, match="--budget"):
            demo.check_budget(bad)
