"""Starting one testbed's language model from another's (mmtok.testbed.transfer)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.models import get_spec  # noqa: E402
from mmtok.testbed.transfer import transfer_language_model  # noqa: E402

WORDS = "USER : how many red objects are there ? ASSISTANT :".split()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.set_num_threads(1)
    model, processor = get_spec("testbed-llava").build("tiny", 0)
    out = tmp_path_factory.mktemp("llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, model, processor


def _text_states(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(WORDS)])
    with torch.no_grad():
        return model.model.language_model(input_ids=ids).last_hidden_state


def test_a_qwen2vl_language_model_started_from_llava_computes_what_llava_s_did(llava_dir) -> None:
    out, llava, llava_processor = llava_dir
    qwen, qwen_processor = get_spec("testbed-qwen2vl").build("tiny", 0)
    before = _text_states(qwen, qwen_processor.tokenizer)
    moved = transfer_language_model(qwen, qwen_processor.tokenizer, out)
    want = _text_states(llava.eval(), llava_processor.tokenizer)
    got = _text_states(qwen.eval(), qwen_processor.tokenizer)
    # Same words, different ids: the text-only states match, so the decoder and the word rows moved over.
    assert not torch.allclose(before, want, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5)
    layers = qwen.config.text_config.num_hidden_layers
    assert moved["zeroed"] == 3 * layers  # Qwen2's q / k / v biases, absent from Llama
    assert moved["tensors"] == 9 * layers + 1  # q k v o, gate up down, two norms per layer; the final norm
    video_words = {"appeared", "flashed"} & set(qwen_processor.tokenizer.get_vocab())
    assert video_words and moved["new_words"] >= len(video_words) + 4  # video words and Qwen's placeholders
    assert moved["words"] + moved["new_words"] == len(qwen_processor.tokenizer.get_vocab())


def test_transfer_refuses_other_shapes_and_missing_files(llava_dir, tmp_path) -> None:
    out, _, _ = llava_dir
    from mmtok.testbed.models import Size

    wider = Size(image_size=56, video_size=56, patch_size=14, merge_size=2, vision_hidden=32, vision_layers=1,
                 vision_heads=2, text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, mlp_ratio=4)
    qwen, processor = get_spec("testbed-qwen2vl").build(wider, 0)
    with pytest.raises(ValueError, match="same shape"):
        transfer_language_model(qwen, processor.tokenizer, out)
    with pytest.raises(ValueError, match="missing"):
        transfer_language_model(qwen, processor.tokenizer, tmp_path)


def test_the_shipped_qwen2vl_shape_takes_the_shipped_llava_language_model() -> None:
    from mmtok.loading import ROOT

    shipped = ROOT / "assets" / "testbed-llava"
    if not shipped.is_dir():
        pytest.skip("assets/testbed-llava not built")
    qwen, processor = get_spec("testbed-qwen2vl").build("full", 0)
    moved = transfer_language_model(qwen, processor.tokenizer, shipped)
    assert moved["tensors"] == 9 * 3 + 1 and moved["zeroed"] == 3 * 3
    assert moved["words"] > 60  # the image words, the chat words and the specials they share


def test_training_records_the_language_model_source_and_replaces_a_warm_starts(llava_dir, tmp_path) -> None:
    from mmtok.testbed.train import train

    out, llava, llava_processor = llava_dir
    args = dict(size="tiny", steps=1, batch_size=2, lr=1e-3, warmup=0, seed=0, eval_every=0, log=lambda s: None)
    run = train("testbed-qwen2vl", work_dir=tmp_path / "run", until=0, init_lm_from=out, **args)
    assert run["settings"]["init_lm_from"] == str(out)
    want = _text_states(llava.eval(), llava_processor.tokenizer)
    assert torch.allclose(_text_states(run["model"].eval(), run["processor"].tokenizer), want, atol=1e-5)
    # A warm start keeps its vision tower and takes the other testbed's language model.
    warm = train("testbed-qwen2vl", work_dir=tmp_path / "warm", until=1, **args)
    both = train("testbed-qwen2vl", work_dir=tmp_path / "both", until=0, init_lm_from=out,
                 init_from=tmp_path / "warm", **args)
    assert torch.allclose(_text_states(both["model"].eval(), both["processor"].tokenizer), want, atol=1e-5)
    tower = {k: v for k, v in warm["model"].state_dict().items() if ".visual." in k or k.startswith("model.visual")}
    assert tower and all(torch.equal(both["model"].state_dict()[k], v) for k, v in tower.items())
