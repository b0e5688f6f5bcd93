"""``mmtok bench kernels`` on tiny sizes: valid JSON, the expected keys, the device named."""

from __future__ import annotations

import json

import pytest
import torch

from mmtok.bench import kernels as bench
from mmtok.cli import main


def test_run_writes_json_and_markdown_names_the_device(tmp_path):
    out = tmp_path / "k.json"
    res = bench.run(sizes=(40,), dims=(8, 16), device="cpu", repeats=1, out_path=out)
    assert json.loads(out.read_text()) == res
    assert not list(tmp_path.glob("*.tmp"))
    assert res["bench"] == "kernels" and res["device_type"] == "cpu" and res["dtype"] == "float32"
    assert res["device"] == bench.device_name(torch.device("cpu")) and res["device"]
    assert set(res["bytes_counted"]) == set(bench.KERNELS)
    rows = res["results"]
    assert [(r["kernel"], r["dim"], r["impl"]) for r in rows] == [
        (k, d, i) for d in (8, 16) for k in bench.KERNELS for i in ("torch", "triton")
    ]
    for r in rows:
        assert {"kernel", "impl", "n", "dim", "k", "bytes", "ms", "runs", "gbps", "status"} <= set(r)
        if r["impl"] == "torch":
            assert r["status"] == "measured" and r["ms"] > 0 and r["runs"] == 1
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / 1e9)
        else:
            assert r["status"] == bench.NO_GPU and r["ms"] is None and r["gbps"] is None
    merge = next(r for r in rows if r["kernel"] == "merge_tokens" and r["dim"] == 8)
    assert merge["k"] == 10 and merge["bytes"] == 40 * 8 * 4 + 40 * 12 + 10 * 8 * 4 + 10 * 4
    kc = next(r for r in rows if r["kernel"] == "kcenter" and r["dim"] == 16)
    assert kc["k"] == 4 and kc["bytes"] == 3 * 40 * 16 * 4
    md = bench.to_markdown(res)
    assert res["device"] in md and bench.NO_GPU in md
    assert md.count("\n| merge_tokens ") == 2 and "| 40 " in md


def test_run_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="unknown kernels"):
        bench.run(sizes=(8,), dims=(4,), device="cpu", kernels=("nope",))


def test_cli_bench_kernels(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--sizes", "24", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["device"] in text and {r["n"] for r in res["results"]} == {24}
