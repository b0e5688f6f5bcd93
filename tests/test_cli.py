"""The command line: the demo table, compress, listing, errors."""

from __future__ import annotations

import json

import pytest

import mmtok
from mmtok.cli import main
from mmtok.commands.compress import model_free_methods, parse_budget
from mmtok.commands.demo import SAMPLE
from mmtok.pixel_encoder import pixel_tokens


def test_demo_prints_every_image_compressor_at_two_budgets(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "576 tokens" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert len(model_free_methods()) >= 15
    for name in model_free_methods():
        assert name in lines, f"{name} missing from the demo table"
        cls = mmtok.compressors.compressor_class(name)
        row = lines[name]
        kept = [int(v) for v in row[3:5]]  # method, stage, requires, kept @ 25 %, kept @ 64
        if not cls.honours_budget:
            assert kept == [576, 576]
        elif cls.adaptive:
            assert kept[0] <= 144 and kept[1] <= 64
        else:
            assert kept == [144, 64]


def test_compress_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "compress",
                str(SAMPLE),
                "--methods",
                "random",
                "identity",
                "--budgets",
                "10",
                "50%",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["targets"] == [10, 288]
    assert [r["kept"] for r in res["rows"]] == [[10, 288], [576, 576]]
    assert not list(tmp_path.glob("*.tmp"))


def test_compress_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert main(["compress", str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "missing.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["compress", str(SAMPLE), "--methods", "nope"]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["compress", str(SAMPLE), "--budgets", "0"]) == 2
    assert main(["compress", str(SAMPLE), "--budgets", "9999"]) == 2
    assert "larger than" in capsys.readouterr().err


@pytest.mark.parametrize("text, want", [("64", 64), ("0.25", 0.25), ("10%", 0.1)])
def test_parse_budget(text, want):
    assert parse_budget(text) == pytest.approx(want)


def test_compressors_listing(capsys):
    assert main(["compressors", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(mmtok.list_compressors())


def test_pixel_tokens_shapes_and_signals():
    t = pixel_tokens(SAMPLE, grid=(6, 8), dim=32)
    assert t.features.shape == (1, 48, 32) and t.grid == (6, 8)
    assert t.cls_attn.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert t.text.shape == (1, 1, 32)
    with pytest.raises(ValueError, match="positive"):
        pixel_tokens(SAMPLE, grid=(0, 4))


def test_readme_lists_every_compressor():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in mmtok.list_compressors():
        assert f"| {name} " in readme, f"README's compressor table lacks {name}"


@pytest.mark.parametrize(("flags", "want"), [
    ([], (None, None, None, False, False, False)),  # the spec's from-scratch recipe decides (mmtok.testbed.train_settings)
    (["--no-position-ramp", "--family-mix", "none", "--attention-layers", "1"], (False, {}, [1], False, False, False)),
    (["--position-ramp", "--family-mix", "count=3", "--swap-marks", "--relation-every-word", "--lookalike-marks"],
     (True, {"count": 3}, None, True, True, True)),
])
def test_testbed_train_passes_recipe_options_through_unset_or_off(monkeypatch, flags, want):
    import mmtok.testbed.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda name, **kw: seen.update(kw, name=name))
    monkeypatch.setattr("mmtok.testbed.allocator.keep_freed_memory", lambda: False)
    assert main(["testbed", "train", "testbed-llava", "--no-export", *flags]) == 0
    assert seen["name"] == "testbed-llava"
    assert (seen["position_ramp"], seen["family_mix"], seen["attention_layers"], seen["swap_marks"],
            seen["relation_every_word"], seen["lookalike_marks"]) == want


def test_testbed_train_passes_family_mix_switches_in_order(monkeypatch):
    import mmtok.testbed.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda name, **kw: seen.update(kw))
    monkeypatch.setattr("mmtok.testbed.allocator.keep_freed_memory", lambda: False)
    assert main(["testbed", "train", "testbed-llava", "--no-export"]) == 0
    assert seen["family_mix_from"] is None
    assert main(["testbed", "train", "testbed-llava", "--no-export", "--family-mix-from", "3300:position=3,relation=3",
                 "--family-mix-from", "5000:none"]) == 0
    assert seen["family_mix_from"] == [(3300, {"position": 3, "relation": 3}), (5000, {})]
