"""Testbed models: specs, tokenizer, training batches, seeded / resumable training, evaluation, the shipped model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import HELDOUT_SPLIT, dataset, families, item, vocabulary  # noqa: E402
from mmtok.testbed.models import IGNORE, SPECS, encode_items, get_spec, word_tokenizer  # noqa: E402
from mmtok.testbed.train import lr_factor, train  # noqa: E402
from mmtok.testbed.train_measures import heldout_accuracy, media_gain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "testbed-llava"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    return get_spec("testbed-llava").build("tiny", seed=0)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="testbed-llava"):
        get_spec("testbed-nope")
    with pytest.raises(ValueError, match="full"):
        get_spec("testbed-llava").build("huge")


def test_full_spec_sizes():
    from transformers import LlavaForConditionalGeneration

    size = SPECS["testbed-llava"].sizes["full"]
    assert size.visual_tokens >= 256
    model, processor = SPECS["testbed-llava"].build("full", seed=0)
    assert isinstance(model, LlavaForConditionalGeneration)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n <= 12_000_000  # fp16 bytes: the three testbeds together stay under 40 MB
    it = item("image", "train", 0)
    out = processor(text=["USER: <image>\nx ASSISTANT:"], images=[it.media], return_tensors="pt")
    assert int((out["input_ids"] == model.config.image_token_id).sum()) == size.visual_tokens
    assert tuple(out["pixel_values"].shape) == (1, 3, size.image_size, size.image_size)


def test_tokenizer_covers_the_vocabulary_one_token_per_word(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    for word in vocabulary("image"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    for it in dataset("image", HELDOUT_SPLIT, 16, form="mixed"):
        ids = tok(it.prompt + " " + it.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(tok(it.answer, add_special_tokens=False)["input_ids"]) == it.answer


def test_word_tokenizer_decodes_with_single_spaces():
    tok = word_tokenizer(["a", "b", "?"], [])
    assert tok.decode(tok("a b ?", add_special_tokens=False)["input_ids"]) == "a b ?"
    assert tok("c", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_encode_items_labels_only_the_answer(tiny):
    model, processor = tiny
    items = list(dataset("image", "train", 4, form="mixed"))
    batch = encode_items(processor, items)
    tok = processor.tokenizer
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 4
    n_vis = SPECS["testbed-llava"].sizes["tiny"].visual_tokens
    for row, it in enumerate(items):
        labels = batch["labels"][row]
        answer = tok.decode(labels[labels != IGNORE][:-1])
        assert answer == it.answer
        assert int(labels[labels != IGNORE][-1]) == tok.eos_token_id
        assert int((batch["input_ids"][row] == model.config.image_token_id).sum()) == n_vis
        # the answer follows the prompt directly; padding only after it
        length = int(batch["attention_mask"][row].sum())
        assert int(labels[length - 1]) == tok.eos_token_id
    with pytest.raises(ValueError):
        encode_items(processor, [])


def test_media_gain_is_zero_when_every_item_shows_the_same_media(tiny):
    from dataclasses import replace

    model, processor = tiny
    items = list(dataset("image", HELDOUT_SPLIT, 4, form="mixed"))
    same = [replace(it, media=items[0].media) for it in items]
    assert media_gain(model, processor, same) == 0.0
    assert media_gain(model, processor, items) != 0.0
    with pytest.raises(ValueError):
        media_gain(model, processor, items[:1])


def test_media_gain_swaps_media_within_each_modality():
    # Qwen2-VL batches mix images and videos; an image must never be handed a video's frames.
    model, processor = get_spec("testbed-qwen2vl").build("tiny", seed=0)
    images = list(dataset("image", HELDOUT_SPLIT, 2, form="mixed"))
    videos = list(dataset("video", HELDOUT_SPLIT, 2, form="mixed"))
    assert isinstance(media_gain(model, processor, images + videos), float)
    with pytest.raises(ValueError, match="each modality"):
        media_gain(model, processor, images + videos[:1])


def test_lr_schedule_known_values():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)


def _run(tmp: Path, **kw):
    args = dict(size="tiny", steps=3, batch_size=8, lr=5e-3, warmup=0, seed=0, work_dir=tmp, eval_every=0,
                log=lambda s: None)
    args.update(kw)
    return train("testbed-llava", **args)


def test_training_decreases_loss_and_is_reproducible(tmp_path):
    model0, processor = get_spec("testbed-llava").build("tiny", seed=0)
    batch = encode_items(processor, list(dataset("image", "train", 8, 0, form="mixed")))
    with torch.no_grad():
        before = float(model0(**batch).loss)
    a = _run(tmp_path / "a")
    with torch.no_grad():
        after = float(a["model"](**batch).loss)
    assert after < before - 0.1
    b = _run(tmp_path / "b")
    assert a["losses"] == b["losses"]
    for (name, pa), pb in zip(a["model"].state_dict().items(), b["model"].state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    w = _run(tmp_path / "w", workers=1)  # batches are a pure function of the step: workers change nothing
    assert w["losses"] == a["losses"]
    c = _run(tmp_path / "c", seed=1)
    assert c["losses"] != a["losses"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_resume_continues_exactly(tmp_path):
    full = _run(tmp_path / "full")
    part = _run(tmp_path / "part", until=2)
    assert len(part["losses"]) == 2
    rest = _run(tmp_path / "part", resume=True)
    assert rest["losses"] == full["losses"]
    for pa, pb in zip(full["model"].state_dict().values(), rest["model"].state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="checkpoint"):
        _run(tmp_path / "part", resume=True, lr=1e-3)


def test_export_loads_offline_and_generation_agrees_with_teacher_forcing(tmp_path):
    import mmtok
    from mmtok.testbed.evaluate import evaluate, heldout

    out = tmp_path / "export"
    run = _run(tmp_path / "w", steps=6, out=out, eval_n=1, eval_every=3)
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "heldout" in r] == [3, 6]
    _run(tmp_path / "w13", steps=13, eval_n=1, eval_every=None)  # unsaid: every 13 // 6 steps, and the last
    log = [json.loads(line) for line in (tmp_path / "w13" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "heldout" in r] == [2, 4, 6, 8, 10, 12, 13]
    assert all(isinstance(r["media_gain"], float) for r in log if "heldout" in r)
    card = (out / "README.md").read_text()
    assert "testbed-llava" in card and "| image | count |" in card
    model, processor = mmtok.load(out, dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    assert (out / "model.safetensors").is_file()
    items = heldout(["image"], 2)
    assert [it.family for it in items[::2]] == families("image")
    # The eval path (chat template, generate) must score what training optimised (teacher forcing).
    trained, proc = run["model"], run["processor"]
    forced = heldout_accuracy(trained, proc, items, batch_size=1)
    report = evaluate(trained, proc, items, method="identity", budget=1.0, batch_size=1)
    assert report.by_family() == {k: v for k, v in forced.items() if k != "mean"}
    assert all(s.total == 2 for s in report.scores)


def test_cli_eval_on_an_exported_directory(tmp_path, capsys):
    from mmtok.cli import main

    out = tmp_path / "export"
    _run(tmp_path / "w", steps=1, out=out, eval_n=1)
    assert main(["testbed", "eval", str(out), "--n", "1", "--method", "random", "--budget", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "random @ 0.5" in text and "mean" in text and "read" in text


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="assets/testbed-llava not built")
def test_shipped_llava_loads_offline_and_answers():
    import mmtok
    from mmtok.testbed.evaluate import normalise

    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size < 12_000_000
    model, processor = mmtok.load("testbed-llava", dtype="float32")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    # Fixed held-out items (index, family) the shipped model answers at full budget.
    fixed = [item("image", HELDOUT_SPLIT, i, 0, family=f, form="mixed") for f, i in SHIPPED_ITEMS]
    result = mmtok.compress_then_generate(
        model, processor, prompt=[it.prompt for it in fixed], images=[it.media for it in fixed], method="identity",
        budget=1.0, max_new_tokens=10, do_sample=False,
    )
    assert [normalise(t) for t in result.text] == [it.answer for it in fixed]


SHIPPED_AUDIO = ROOT / "assets" / "testbed-audio"


@pytest.mark.skipif(not SHIPPED_AUDIO.is_dir(), reason="assets/testbed-audio not built")
def test_shipped_audio_loads_offline_and_answers():
    import mmtok
    from mmtok.testbed.evaluate import normalise
    from mmtok.testbed.models import chat_prompt

    assert (SHIPPED_AUDIO / "model.safetensors").stat().st_size < 12_000_000
    model, processor = mmtok.load("testbed-audio", dtype="float32")
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    # No mmtok adapter takes audio yet, so the stock generate() answers (one held-out item per family).
    for family, index in SHIPPED_AUDIO_ITEMS:
        it = item("audio", HELDOUT_SPLIT, index, 0, family=family, form="mixed")
        batch = processor(text=[chat_prompt(processor, it)], audio=[it.media], sampling_rate=it.sample_rate,
                          return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
        text = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert normalise(text) == it.answer, (family, index, text)


SHIPPED_AUDIO_ITEMS = [("beep_count", 0), ("higher", 0), ("longer", 0), ("louder", 0), ("chirp", 0)]

SHIPPED_QWEN = ROOT / "assets" / "testbed-qwen2vl"


def test_shipped_weights_stay_under_40_mb_together():
    sizes = {p.parent.name: p.stat().st_size for p in (ROOT / "assets").glob("testbed-*/model.safetensors")}
    assert sum(sizes.values()) < 40_000_000, sizes


@pytest.mark.skipif(not SHIPPED_QWEN.is_dir(), reason="assets/testbed-qwen2vl not built")
def test_shipped_qwen2vl_loads_offline_and_answers_images_and_videos():
    import mmtok
    from mmtok.testbed.evaluate import normalise

    assert (SHIPPED_QWEN / "model.safetensors").stat().st_size < 12_000_000
    model, processor = mmtok.load("testbed-qwen2vl", dtype="float32")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    fixed = [item(modality, HELDOUT_SPLIT, i, 0, family=f, form="mixed") for modality, f, i in SHIPPED_QWEN_ITEMS]
    # One mixed batch, through the adapter: M-RoPE positions of image and video rows side by side.
    result = mmtok.compress_then_generate(
        model, processor, prompt=[it.prompt for it in fixed],
        images=[[it.media] if it.modality == "image" else [] for it in fixed],
        videos=[[it.media] if it.modality == "video" else [] for it in fixed],
        method="identity", budget=1.0, max_new_tokens=10, do_sample=False,
    )
    assert [normalise(t) for t in result.text] == [it.answer for it in fixed]


# Held-out items the shipped checkpoints answer at full budget, one per family (the first each answers right
# among the first 12: update them with the weights). Fast (8 and 15 items), so they run in `make test`.
SHIPPED_ITEMS = [("count", 0), ("position", 0), ("relation", 0), ("read", 0), ("odd_one_out", 0), ("inside", 0),
                 ("largest", 0), ("exists", 0)]
SHIPPED_QWEN_ITEMS = [
    ("image", "count", 0), ("image", "position", 0), ("image", "relation", 0), ("image", "read", 0),
    ("image", "odd_one_out", 0), ("image", "inside", 0), ("image", "largest", 0), ("image", "exists", 0),
    ("video", "first", 0), ("video", "last", 0), ("video", "flash_count", 0), ("video", "moved", 0),
    ("video", "direction", 0), ("video", "change", 0), ("video", "when", 0),
]


def test_warm_start_takes_the_weights_and_continues_the_data(tmp_path):
    first = _run(tmp_path / "first", steps=2)
    warm = _run(tmp_path / "warm", steps=3, until=0, init_from=tmp_path / "first")
    for (name, a), b in zip(first["model"].state_dict().items(), warm["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert warm["settings"]["init_from"]["items"] == 2 * 8
    assert warm["settings"]["init_from"]["step"] == 2
    done = _run(tmp_path / "warm", steps=3, resume=True, init_from=tmp_path / "first")
    assert len(done["losses"]) == 3
    # the stages a model went through travel with each warm start, oldest first
    assert [s["step"] for s in done["settings"]["init_from"]["lineage"]] == [2]
    third = _run(tmp_path / "third", steps=1, init_from=tmp_path / "warm", out=tmp_path / "card", eval_n=1)
    lineage = third["settings"]["init_from"]["lineage"]
    assert [(s["step"], s["steps"], s["batch_size"]) for s in lineage] == [(2, 2, 8), (3, 3, 8)]
    assert third["settings"]["init_from"]["items"] == (2 + 3) * 8
    card = (tmp_path / "card" / "README.md").read_text()
    assert "| 1 | 2 of 2 x 8 |" in card and "| 2 | 3 of 3 x 8 |" in card and "| 3 | 1 of 1 x 8 |" in card
    with pytest.raises(FileNotFoundError, match="warm-start"):
        _run(tmp_path / "cold", init_from=tmp_path / "nowhere")


def test_a_warm_start_from_an_export_matches_one_from_its_checkpoint(tmp_path):
    _run(tmp_path / "first", steps=2)
    second = _run(tmp_path / "second", steps=2, init_from=tmp_path / "first", out=tmp_path / "export", eval_n=1)
    record = json.loads((tmp_path / "export" / "training.json").read_text())
    assert record["step"] == 2 and record["settings"] == json.loads(json.dumps(second["settings"]))
    from_ckpt = _run(tmp_path / "a", steps=1, until=0, init_from=tmp_path / "second")
    from_export = _run(tmp_path / "b", steps=1, until=0, init_from=tmp_path / "export")
    for (name, a), b in zip(from_ckpt["model"].state_dict().items(), from_export["model"].state_dict().values(),
                            strict=True):
        # the export is fp16: its weights are the checkpoint's, rounded
        assert torch.equal(a.half().float(), b), name
    ours, theirs = from_export["settings"]["init_from"], from_ckpt["settings"]["init_from"]
    assert ours["path"].endswith("training.json") and theirs["path"].endswith("checkpoint.pt")
    assert ours["items"] == theirs["items"] == 4 * 8 and ours["step"] == theirs["step"] == 2
    assert ours["lineage"] == theirs["lineage"] and [s["step"] for s in ours["lineage"]] == [2, 2]
    with pytest.raises(FileNotFoundError, match="training.json"):
        _run(tmp_path / "c", steps=1, until=0, init_from=tmp_path / "nowhere")
