"""The public API: load, compress_then_generate's validation, reporting and cleanup, the generate command."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import tiny_models
import torch
from tiny_models import COFFEE, IMAGES, hooks_left

import mmtok
from mmtok.adapters import get_adapter
from mmtok.cli import main
from mmtok.compressors import Compressor
from mmtok.result import Result

# session fixtures shared with the other adapter tests (pytest finds them by these names)
llava, llava_dir = tiny_models.llava, tiny_models.llava_dir

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
ASTRONAUT = IMAGES / "skimage_astronaut.png"


def test_public_names_load_lazily():
    assert mmtok.compress_then_generate is mmtok.api.compress_then_generate
    assert mmtok.load is mmtok.api.load and mmtok.Result is Result


def test_load_errors_say_what_is_missing_and_how_to_get_it(tmp_path):
    with pytest.raises(ValueError, match="testbed-nothing-here.*not installed"):
        mmtok.load("testbed-nothing-here")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"missing model weights.*tokenizer files.*huggingface-cli download"):
        mmtok.load(tmp_path)
    with pytest.raises(ValueError, match=r"not on this machine.*config\.json.*huggingface-cli download nobody-xyz/no-model"):
        mmtok.load("nobody-xyz/no-model")
    with pytest.raises(ValueError, match="neither a model directory nor"):
        mmtok.load(tmp_path / "absent" / "dir")


def test_loads_with_dtype_and_attention_options(llava_dir):
    model, processor = mmtok.load(llava_dir, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    res = mmtok.compress_then_generate(
        model, processor, prompt=PROMPT, images=str(COFFEE), method="divprune", budget=4, max_new_tokens=1
    )
    assert res.tokens["image"]["after"] == [4]
    with pytest.raises(ValueError, match="dtype must be a torch dtype"):
        mmtok.load(llava_dir, dtype="float77")


def _count_forward_calls(model):
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (model.model.vision_tower, model.model.language_model)]
    return calls, handles


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=PROMPT), "has 1 image placeholder.*0 image"),
        (dict(prompt=PROMPT, images=[str(COFFEE), str(ASTRONAUT)]), "has 1 image placeholder.*2 image"),
        (dict(prompt=PROMPT, images=str(COFFEE), budget=17), "budget 17 is larger than the 16 tokens"),
        (dict(prompt=[PROMPT, PROMPT], images=[str(COFFEE)]), "with 2 prompts, images must be a list of 2"),
        (dict(prompt=PROMPT, images=str(COFFEE), method="no-such-method"), "unknown compressor"),
        (dict(prompt=PROMPT, images=str(COFFEE), method="coverage", stage="vision"), "runs at stages"),
        (dict(prompt=PROMPT, images=str(COFFEE), videos="clip.mp4"), "take no videos"),
        (dict(prompt="", images=str(COFFEE)), "non-empty"),
    ],
)
def test_bad_input_is_a_value_error_before_anything_runs(llava, kwargs, match):
    model, processor = llava
    calls, handles = _count_forward_calls(model)
    try:
        with pytest.raises(ValueError, match=match):
            mmtok.compress_then_generate(model, processor, **{"method": "random", "budget": 4, **kwargs})
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_corrupt_image_and_unsupported_model_are_value_errors(llava, tmp_path):
    model, processor = llava
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    calls, handles = _count_forward_calls(model)
    try:
        with pytest.raises(ValueError, match="could not decode image .*broken.jpg"):
            mmtok.compress_then_generate(model, processor, prompt=PROMPT, images=str(bad), method="random", budget=4)
        with pytest.raises(FileNotFoundError, match="image file not found"):
            mmtok.compress_then_generate(model, processor, prompt=PROMPT, images=str(tmp_path / "gone.png"))
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    other = SimpleNamespace(config=SimpleNamespace(model_type="blip_2"))
    with pytest.raises(ValueError, match=r"no mmtok adapter for model_type 'blip_2'.*llava.*qwen2_5_vl.*qwen2_vl"):
        mmtok.compress_then_generate(other, processor, prompt=PROMPT, images=str(COFFEE))


def test_a_prompt_without_placeholders_gets_the_chat_template(llava):
    model, processor = llava
    req = get_adapter(model, processor).prepare(["What is this?", "And this?"], images=[str(COFFEE), None])
    assert req.prompts == ["USER: <image>\nWhat is this? ASSISTANT:", "And this?"]
    assert req.item_rows["image"] == [0] and req.item_lengths["image"] == [16]


def test_compare_reports_both_runs_and_a_table(llava):
    model, processor = llava
    res = mmtok.compress_then_generate(
        model, processor, prompt=PROMPT, images=str(COFFEE), method="random", budget=0.25, compare=True,
        max_new_tokens=3, do_sample=False,
    )
    assert isinstance(res.text, str) and isinstance(res.baseline, Result)
    assert res.tokens["image"] == {"before": [16], "after": [4]}
    assert res.baseline.tokens["image"] == {"before": [16], "after": [16]}
    assert res.baseline.tokens["sequence"]["seen"][0] - res.tokens["sequence"]["seen"][0] == 12
    for r in (res, res.baseline):
        assert set(r.timings) >= {"encode", "compress", "prefill", "decode", "total"}
        assert all(v >= 0 for v in r.timings.values()) and r.timings["prefill"] > 0
        assert r.peak_memory_bytes is None or r.peak_memory_bytes > 0
    table = res.table()
    assert "image tokens" in table and "uncompressed" in table and "25.0%" in table
    assert res.plans["image"].counts.tolist() == [4] and res.grids["image"] == [(4, 4)]


def test_ragged_budgets_and_text_aware_methods(llava):
    model, processor = llava
    res = mmtok.compress_then_generate(
        model, processor, prompt=[PROMPT, PROMPT], images=[str(COFFEE), str(ASTRONAUT)], method="coverage",
        budget=[3, 9], max_new_tokens=1,
    )
    assert res.tokens["image"]["after"] == [3, 9]
    assert res.tokens["sequence"]["seen"] == [n - 16 + k for n, k in zip(res.tokens["sequence"]["before"], [3, 9], strict=True)]


class _Boom(Compressor):
    name = "boom"
    stages = ("vision", "pre_llm")
    requires = frozenset({"cls_attn"})

    def plan_row(self, row, k, generator):
        raise RuntimeError("boom")


def test_hooks_are_removed_when_a_method_fails(llava):
    model, processor = llava
    before = hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"):
        mmtok.compress_then_generate(model, processor, prompt=PROMPT, images=str(COFFEE), method=_Boom(), budget=4)
    assert hooks_left(model) == before


def test_llm_stage_reports_the_reduced_cache_and_leaves_no_hook(llava):
    model, processor = llava
    # transformers installs its own output-recording hooks on the vision tower on first use: warm up first
    mmtok.compress_then_generate(model, processor, prompt=PROMPT, images=str(COFFEE), method="identity", budget=1.0, max_new_tokens=1)
    before = hooks_left(model)
    res = mmtok.compress_then_generate(
        model, processor, prompt=[PROMPT, PROMPT, "USER: hi ASSISTANT:"], images=[str(COFFEE), str(ASTRONAUT), None],
        method=mmtok.create_compressor("fastv", layer=1), budget=4, max_new_tokens=2, do_sample=False,
    )
    seq = res.tokens["sequence"]
    assert res.stage == "llm" and res.tokens["image"]["after"] == [4, 4, 0]
    assert seq["seen"] == seq["before"]  # the LM receives every token, drops them at layer 1
    assert seq["kv"] == seq["after"] == [seq["before"][0] - 12, seq["before"][1] - 12, seq["before"][2]]
    assert hooks_left(model) == before


def test_generate_command_prints_the_answer_and_the_table(llava_dir, capsys):
    code = main(
        [
            "generate", "--model", str(llava_dir), "--image", str(COFFEE), "--prompt", "What is this?",
            "--method", "random", "--budget", "4", "--max-new-tokens", "2", "--compare",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("answer: ") and "answer without compression: " in out
    row = next(line.split() for line in out.splitlines() if line.startswith("image tokens"))
    assert row[2:5] == ["16", "4", "25.0%"]


def test_generate_command_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--model", "testbed-missing-model", "--prompt", "hi"]) == 2
    assert "testbed-missing-model" in capsys.readouterr().err
    assert main(["generate", "--model", "x/y", "--image", str(tmp_path / "no.jpg"), "--prompt", "hi"]) == 2
    assert "media file not found" in capsys.readouterr().err
