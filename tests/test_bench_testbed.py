"""``mmtok bench testbed``: both ways of reading the supervised attention give the same training loss."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.bench import testbed  # noqa: E402
from mmtok.testbed.models import get_spec  # noqa: E402


def test_both_ways_same_loss_and_table(tmp_path) -> None:
    size = replace(get_spec("testbed-qwen2vl").sizes["tiny"], text_layers=2)
    out = tmp_path / "testbed.json"
    res = testbed.run(out, repeats=1, cases=(("testbed-qwen2vl", 2),), size=size)
    assert out.is_file()
    eager, rows, split = res["results"]
    assert [r["way"] for r in res["results"]] == ["eager + output_attentions", "sdpa + query_rows", testbed.SPLIT]
    assert abs(eager["loss"] - rows["loss"]) < 1e-4 and abs(eager["loss"] - split["loss"]) < 1e-4
    assert eager["loss"] > 0
    header, _, *lines = testbed.to_markdown(res).splitlines()
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert cells[:3] == ["testbed-qwen2vl", "2", "sdpa + query_rows"] and "speed-up" in header
    assert cells[4] == f"{eager['ms'] / rows['ms']:.2f}x"
