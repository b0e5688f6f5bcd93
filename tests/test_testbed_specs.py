"""testbed-qwen2vl and testbed-audio: stock classes, token floors, size caps, batches, export, the mmtok path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import assert_same_run, greedy_kwargs  # noqa: E402

from mmtok.testbed.data import HELDOUT_SPLIT, dataset, item, vocabulary  # noqa: E402
from mmtok.testbed.data.audio import SAMPLE_RATE  # noqa: E402
from mmtok.testbed.models import IGNORE, SPECS, chat_prompt, encode_items, get_spec, media_tokens  # noqa: E402

QWEN, AUDIO = "testbed-qwen2vl", "testbed-audio"
MB = 1_000_000


@pytest.fixture(scope="module")
def tiny_qwen():
    return get_spec(QWEN).build("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_audio():
    return get_spec(AUDIO).build("tiny", seed=0)


def _fp16_bytes(model: torch.nn.Module) -> int:
    return 2 * sum(p.numel() for p in model.parameters())


def test_specs_use_the_stock_classes(tiny_qwen, tiny_audio):
    from transformers import (
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        WhisperFeatureExtractor,
    )

    model, processor = tiny_qwen
    assert isinstance(model, Qwen2VLForConditionalGeneration) and model.training
    assert isinstance(processor, Qwen2VLProcessor)
    assert SPECS[QWEN].modalities == ("image", "video")
    model, processor = tiny_audio
    assert isinstance(model, Qwen2AudioForConditionalGeneration) and model.training
    assert isinstance(processor, Qwen2AudioProcessor)
    fe = processor.feature_extractor
    assert isinstance(fe, WhisperFeatureExtractor)
    assert (fe.feature_size, fe.sampling_rate, fe.n_samples) == (128, SAMPLE_RATE, 3 * SAMPLE_RATE)
    assert model.config.audio_config.num_mel_bins == 128
    # the same seed gives the same weights
    again, _ = get_spec(AUDIO).build("tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_full_sizes_meet_the_token_floors_and_the_weight_caps():
    qwen, qproc = SPECS[QWEN].build("full", seed=0)
    size = SPECS[QWEN].sizes["full"]
    image, video = item("image", "train", 0), item("video", "train", 0)
    assert len(video.media) == 16 and video.media[0].size == (336, 336)  # the processor keeps 336 px frames
    n_image = media_tokens(qwen, qproc, "image")
    n_video = media_tokens(qwen, qproc, "video")
    assert n_image == size.visual_tokens == 256  # 448 px: 32 x 32 patches, 2 x 2 merge
    assert n_video == size.video_tokens(16) == 8 * 12 * 12 >= 1000  # 336 px frames, 2 frames per patch
    grids = encode_items(qproc, [image, video])
    assert grids["image_grid_thw"].tolist() == [[1, 32, 32]] and grids["video_grid_thw"].tolist() == [[8, 24, 24]]
    audio, aproc = SPECS[AUDIO].build("full", seed=0)
    assert media_tokens(audio, aproc, "audio") == 75  # 3 s: 300 mel frames -> 150 -> 75
    llava, _ = SPECS["testbed-llava"].build("full", seed=0)
    assert _fp16_bytes(qwen) <= 12 * MB and _fp16_bytes(audio) <= 8 * MB
    assert _fp16_bytes(qwen) + _fp16_bytes(audio) + _fp16_bytes(llava) < 40 * MB
    lines = SPECS[QWEN].describe(qwen, qproc)
    assert "256 per image, 1152 per video" in lines[0] and "qwen2_vl_text" in lines[1]


@pytest.mark.parametrize("name", [QWEN, AUDIO])
def test_tokenizer_covers_the_vocabulary_one_token_per_word(name, tiny_qwen, tiny_audio):
    _, processor = tiny_qwen if name == QWEN else tiny_audio
    tok = processor.tokenizer
    for modality in SPECS[name].modalities:
        for word in vocabulary(modality):
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
        for it in dataset(modality, HELDOUT_SPLIT, 8, form="mixed"):
            assert tok.unk_token_id not in tok(chat_prompt(processor, it) + " " + it.answer)["input_ids"]
            assert tok.decode(tok(it.answer, add_special_tokens=False)["input_ids"]) == it.answer


def _check_rows(batch, processor, items):
    tok = processor.tokenizer
    for row, it in enumerate(items):
        alone = processor.tokenizer(chat_prompt(processor, it))["input_ids"]  # text only: before expansion
        answer = tok(it.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][row]
        at = (labels != IGNORE).nonzero().flatten()
        start, length = int(at[0]), int(batch["attention_mask"][row].sum())
        assert at.tolist() == list(range(start, start + len(answer)))  # one run, right after the prompt
        assert labels[at].tolist() == answer
        assert batch["input_ids"][row, start:start + len(answer)].tolist() == answer
        assert start + len(answer) == length and not batch["attention_mask"][row, length:].any()
        assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
        assert len(alone) < start  # the media placeholders were expanded in the prompt


def test_encode_items_mixed_images_and_videos(tiny_qwen):
    model, processor = tiny_qwen
    cfg = model.config
    items = [item("video", "train", 0, form="mc"), item("image", "train", 0), item("image", "train", 1),
             item("video", "train", 1)]
    batch = encode_items(processor, items)
    _check_rows(batch, processor, items)
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    assert ((ids == cfg.image_token_id).sum(1)).tolist() == [0, 4, 4, 0]
    assert ((ids == cfg.video_token_id).sum(1)).tolist() == [32, 0, 0, 32]
    want = torch.zeros_like(ids)
    want[ids == cfg.image_token_id] = 1
    want[ids == cfg.video_token_id] = 2
    assert torch.equal(types, want)  # answer words and padding are text (0)
    # media tensors: concatenated in item order over the items that have them (not padded like tokens)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2 and batch["video_grid_thw"].tolist() == [[8, 4, 4]] * 2
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * 14 * 14)
    assert batch["pixel_values_videos"].shape == (2 * 128, 3 * 2 * 14 * 14)
    single = encode_items(processor, [items[3]])
    assert torch.equal(single["pixel_values_videos"], batch["pixel_values_videos"][128:])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_encode_items_audio(tiny_audio):
    model, processor = tiny_audio
    items = list(dataset("audio", "train", 2, form="mixed"))
    batch = encode_items(processor, items)
    _check_rows(batch, processor, items)
    assert ((batch["input_ids"] == model.config.audio_token_id).sum(1)).tolist() == [75, 75]
    assert batch["input_features"].shape == (2, 128, 300)
    assert batch["feature_attention_mask"].shape == (2, 300) and bool(batch["feature_attention_mask"].all())
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_llava_batches_keep_their_keys():
    _, processor = SPECS["testbed-llava"].build("tiny", seed=0)
    batch = encode_items(processor, list(dataset("image", "train", 2, form="mixed")))
    assert list(batch) == ["input_ids", "attention_mask", "pixel_values", "labels"]


def _train_and_export(name: str, root: Path):
    from mmtok.testbed import train as train_module

    out = root / "export"
    run = train_module.train(name, size="tiny", steps=2, batch_size=2, lr=5e-3, warmup=0, work_dir=root / "w",
                             eval_every=0, out=out, eval_n=1, log=lambda s: None)
    card = (out / "README.md").read_text()
    assert card.startswith(f"# {name}") and "- encoder: " in card and "language model: qwen2" in card
    return run, out


@pytest.fixture(scope="module")
def qwen_export(tmp_path_factory):
    return _train_and_export(QWEN, tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def audio_export(tmp_path_factory):
    return _train_and_export(AUDIO, tmp_path_factory.mktemp("audio"))


def _fp16_copy(model):
    ref = type(model)(model.config).eval()
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return ref


def test_qwen2vl_trains_exports_and_loads_with_identical_logits(qwen_export):
    import mmtok

    run, out = qwen_export
    assert len(run["losses"]) == 2 and all(torch.isfinite(torch.tensor(run["losses"])))
    assert (out / "video_preprocessor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    model, processor = mmtok.load(out, dtype="float32")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    items = [item("image", HELDOUT_SPLIT, 0), item("video", HELDOUT_SPLIT, 0)]
    batch = encode_items(run["processor"], items)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _fp16_copy(run["model"])(**batch).logits)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_qwen2vl_identity_equals_the_stock_generate(qwen_export, modality):
    import mmtok
    from mmtok.adapters import get_adapter

    run, out = qwen_export
    model, processor = mmtok.load(out, dtype="float32")
    it = item(modality, HELDOUT_SPLIT, 1)
    media = {f"{modality}s": [it.media]}
    res = mmtok.compress_then_generate(model, processor, prompt=it.prompt, method="identity", budget=1.0, **media,
                                       **greedy_kwargs())
    inputs = get_adapter(model, processor).prepare(it.prompt, **media).inputs
    ref = model.generate(**inputs, **greedy_kwargs())
    assert_same_run(res, ref.logits, ref.sequences[:, inputs["input_ids"].shape[1]:])
    assert res.tokens[modality]["before"] == res.tokens[modality]["after"] == [4 if modality == "image" else 32]
    # the loaded processor (parts, no torchvision) builds exactly the training batch's prompt
    train = encode_items(run["processor"], [it])
    n = int((train["labels"][0] == IGNORE).sum())
    assert torch.equal(inputs["input_ids"][0], train["input_ids"][0, :n])
    pixels = "pixel_values" if modality == "image" else "pixel_values_videos"
    assert torch.equal(inputs[pixels], train[pixels])


def test_audio_trains_exports_loads_and_generates(audio_export):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    run, out = audio_export
    assert len(run["losses"]) == 2 and all(torch.isfinite(torch.tensor(run["losses"])))
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert processor.feature_extractor.sampling_rate == SAMPLE_RATE and processor.feature_extractor.n_samples == 48000
    items = list(dataset("audio", HELDOUT_SPLIT, 2, form="mixed"))
    batch = encode_items(processor, items)
    again = encode_items(run["processor"], items)
    assert all(torch.equal(batch[k], again[k]) for k in again)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(logits, _fp16_copy(run["model"])(**batch).logits)
    # the stock generate: its first greedy token is the argmax after the prompt
    it = items[0]
    inputs = processor(text=[chat_prompt(processor, it)], audio=[it.media], sampling_rate=SAMPLE_RATE,
                       return_tensors="pt")
    with torch.no_grad():
        first = int(model(**inputs).logits[0, -1].argmax())
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert int(gen[0, inputs["input_ids"].shape[1]]) == first


def test_mmtok_load_takes_the_exported_audio_model(audio_export):
    from transformers import AutoModelForMultimodalLM, Qwen2AudioForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    import mmtok
    from mmtok.api import model_class

    run, out = audio_export
    # qwen2_audio is not an image-text-to-text model: load falls back to the multimodal-LM auto class
    assert type(run["model"].config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    assert model_class(str(out)) is AutoModelForMultimodalLM
    model, processor = mmtok.load(out, dtype="float32")
    assert type(model) is Qwen2AudioForConditionalGeneration and not model.training
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    want = _fp16_copy(run["model"]).state_dict()
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
