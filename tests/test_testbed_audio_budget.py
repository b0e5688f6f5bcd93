"""Random pre-LLM pruning of the audio testbed's tokens (`mmtok.testbed.audio_budget`)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.audio_budget import _pruned_language_model, random_budget_accuracy, random_keep  # noqa: E402
from mmtok.testbed.models import encode_items, get_spec  # noqa: E402
from mmtok.testbed.train_measures import heldout_accuracy, heldout_items  # noqa: E402

A = 9


def test_random_keep_keeps_every_text_token_and_an_exact_share_of_the_audio() -> None:
    ids = torch.tensor([[5, A, A, A, A, 6], [A, A, 7, A, A, 8]])
    keep = random_keep(ids, A, 0.5, torch.Generator().manual_seed(0))
    assert keep[ids != A].all() and (keep & (ids == A)).sum(1).tolist() == [2, 2]
    assert random_keep(ids, A, 0.01, torch.Generator().manual_seed(0)).sum(1).tolist() == [3, 3]  # at least one
    assert random_keep(ids, A, 1.0, torch.Generator()).all()
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        random_keep(ids, A, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="same number"):
        random_keep(torch.tensor([[A, 1], [1, 1]]), A, 0.5, torch.Generator())


@pytest.fixture(scope="module")
def shipped_audio():
    import mmtok

    model, processor = mmtok.load("testbed-audio", dtype="float32")
    return model.eval(), processor, heldout_items(get_spec("testbed-audio"), 2)


def test_the_language_model_reads_exactly_the_kept_tokens_at_their_own_positions(shipped_audio) -> None:
    model, processor, items = shipped_audio
    batch = encode_items(processor, items[:3])
    batch.pop("labels")
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    keep = random_keep(batch["input_ids"], model.config.audio_token_id, 0.2, torch.Generator().manual_seed(1))
    rows, width = keep.shape[0], seen["embeds"].shape[-1]
    positions = torch.arange(keep.shape[1]).expand(rows, -1)[keep].view(rows, -1)
    with torch.no_grad(), _pruned_language_model(model, keep):
        pruned = model(**batch).logits
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=seen["embeds"][keep].view(rows, -1, width),
                                            attention_mask=batch["attention_mask"][keep].view(rows, -1),
                                            position_ids=positions).last_hidden_state
    assert pruned.shape[1] == int(keep[0].sum()) < keep.shape[1]
    torch.testing.assert_close(pruned, model.lm_head(hidden))
    with torch.no_grad():  # renumbered positions would read differently: the kept ids are what it used
        renumbered = model.lm_head(model.model.language_model(
            inputs_embeds=seen["embeds"][keep].view(rows, -1, width),
            attention_mask=batch["attention_mask"][keep].view(rows, -1)).last_hidden_state)
    assert not torch.allclose(pruned, renumbered)


def test_the_whole_budget_scores_as_the_card_and_only_qwen2_audio_is_taken(shipped_audio) -> None:
    model, processor, items = shipped_audio
    assert random_budget_accuracy(model, processor, items, 1.0) == heldout_accuracy(model, processor, items)
    llava, llava_processor = get_spec("testbed-llava").build("tiny", 0)
    with pytest.raises(ValueError, match="Qwen2-Audio"):
        random_budget_accuracy(llava, llava_processor, [], 0.5)
    batch = encode_items(processor, items[:2])
    batch.pop("labels")
    with pytest.raises(ValueError, match="expand each audio placeholder"), _pruned_language_model(
            model, torch.ones(2, batch["input_ids"].shape[1] + 1, dtype=torch.bool)):
        model(**batch)


def test_cli_eval_of_the_audio_testbed_prunes_at_random_and_refuses_other_methods(capsys) -> None:
    from mmtok.cli import main

    assert main(["testbed", "eval", "testbed-audio", "--n", "2", "--method", "identity", "--method", "random",
                 "--budget", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "teacher-forced" in lines[0] and lines[1].startswith("identity @ 1.0: beep_count")
    assert lines[2].startswith("random @ 0.1: beep_count") and "mean" in lines[2]
    assert main(["testbed", "eval", "testbed-audio", "--n", "1", "--method", "dart", "--budget", "0.1"]) == 2
    assert "no adapter for qwen2_audio" in capsys.readouterr().err
