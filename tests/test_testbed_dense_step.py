"""dense_step: a mixed Qwen2-VL batch split by medium gives the very losses of the whole batch."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import dataset  # noqa: E402
from mmtok.testbed.data.images import CELL  # noqa: E402
from mmtok.testbed.dense import IMAGE_HEADS, VISUAL_HEADS, DenseProbe, batch_labels, class_word_ids  # noqa: E402
from mmtok.testbed.dense_step import dense_parts, pool, split_by_medium  # noqa: E402
from mmtok.testbed.dense_video import (  # noqa: E402
    APPEARANCE_COLUMN,
    appearance_terms,
    appearance_words,
    motion_words,
    time_words,
    video_batch_labels,
)
from mmtok.testbed.models import Size, encode_items, get_spec  # noqa: E402

# The shipped Qwen2-VL token grids (16 x 16 per image, 8 x 12 x 12 per video) with small widths.
GRID = Size(image_size=448, video_size=336, patch_size=14, merge_size=2, vision_hidden=32, vision_layers=1,
            vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, mlp_ratio=2)
DEEPER = dataclasses.replace(GRID, text_layers=3)  # a layer between the read-outs and the last one


@pytest.fixture(scope="module")
def mixed():
    torch.set_num_threads(1)
    model, processor = get_spec("testbed-qwen2vl").build(GRID, 0)
    items = list(dataset("image", "train", 2, 5, form="mixed")) + list(dataset("video", "train", 2, 5, form="mixed"))
    batch = encode_items(processor, items)
    labels = {"image": batch_labels(items, CELL), "video": video_batch_labels(items)}
    words = model.get_input_embeddings()
    probes = {m: DenseProbe(words, class_word_ids(processor.tokenizer, heads), heads)
              for m, heads in (("image", IMAGE_HEADS), ("video", VISUAL_HEADS))}
    yes_no = tuple(processor.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    return (model.eval(), batch, labels, probes, yes_no, time_words(processor.tokenizer),
            motion_words(processor.tokenizer), appearance_words(processor.tokenizer))


def test_split_cuts_rows_and_padding(mixed) -> None:
    model, batch, *_ = mixed
    image, video = split_by_medium(model, batch)
    assert image["input_ids"].shape[0] == video["input_ids"].shape[0] == 2
    assert video["input_ids"].shape[1] == batch["input_ids"].shape[1]  # the videos are the longest rows
    assert image["input_ids"].shape[1] == int(batch["attention_mask"][:2].sum(1).max()) < batch["input_ids"].shape[1]
    assert torch.equal(image["input_ids"], batch["input_ids"][:2, :image["input_ids"].shape[1]])
    assert "pixel_values_videos" not in image and "pixel_values" not in video
    assert torch.equal(video["pixel_values_videos"], batch["pixel_values_videos"])
    assert split_by_medium(model, image) == [image]  # one medium: whole


def test_pooled_parts_equal_the_whole_batch(mixed) -> None:
    model, batch, labels, probes, yes_no, clock, steps, runs = mixed
    reads = {"time": clock, "motion": steps, "appearance": runs}
    whole = dense_parts(model, batch, labels, probes, yes_no, attend=True, **reads)
    parts = [dense_parts(model, sub, labels, probes, yes_no, attend=True, **reads)
             for sub in split_by_medium(model, batch)]
    assert [sorted(p.tokens) for p in parts] == [["image"], ["video"]]
    with torch.no_grad():
        stock = model(**batch).loss
    weights = dict(attention_weight=0.7, time_weight=0.5, motion_weight=0.3, appearance_weight=0.2)
    answer, dense, terms = pool(parts, **weights)
    want_answer, want_dense, want_terms = pool([whole], **weights)
    assert set(terms) == {"probe", "relevance", "attention", "time", "motion", "appearance"}
    assert all(abs(terms[k] - want_terms[k]) < 1e-5 for k in terms)
    moving = pool(parts, attention_weight=0.7, time_weight=0.5, motion_weight=0.3)[1]
    assert torch.allclose(dense - moving, torch.tensor(0.2 * terms["appearance"]), atol=1e-5)
    timed = pool(parts, attention_weight=0.7, time_weight=0.5)[1]
    assert torch.allclose(moving - timed, torch.tensor(0.3 * terms["motion"]), atol=1e-5)  # the motion read-out counts
    assert not torch.allclose(timed, pool(parts, attention_weight=0.7)[1])  # the time read-out counts
    objects = int((labels["video"][..., 3] >= 0).sum())
    assert int(whole.motion_counts.sum()) == int(parts[1].motion_counts.sum()) == objects > 0
    assert int(parts[0].motion_counts.sum()) == 0
    shown = torch.bincount(labels["video"][..., APPEARANCE_COLUMN][labels["video"][..., APPEARANCE_COLUMN] >= 0],
                           minlength=len(runs))
    assert torch.equal(whole.appearance_counts, shown) and torch.equal(parts[1].appearance_counts, shown)
    assert int(shown.sum()) == int((labels["video"][..., 1] > 0).sum()) >= objects  # every object token has one
    assert int(parts[0].appearance_counts.sum()) == 0
    assert whole.time_count == parts[1].time_count == 2 * 8 * 12 * 12 and parts[0].time_count == 0
    assert torch.allclose(want_answer, stock, atol=1e-5)  # the summed answer loss is the stock one
    assert torch.allclose(answer, want_answer, atol=1e-5)
    assert torch.allclose(dense, want_dense, atol=1e-5)
    assert whole.attention_count == sum(p.attention_count for p in parts) > 0
    assert torch.equal(whole.relevance_counts, sum(p.relevance_counts for p in parts))


def test_the_appearance_read_out_reads_the_chosen_layer(mixed) -> None:
    from mmtok.testbed.media_grid import grid_inputs

    _, batch, labels, probes, yes_no, clock, steps, runs = mixed
    model, processor = get_spec("testbed-qwen2vl").build(DEEPER, 0)
    model = model.eval()
    video = split_by_medium(model, batch)[1]
    probes = {"video": DenseProbe(model.get_input_embeddings(), class_word_ids(processor.tokenizer, VISUAL_HEADS),
                                  VISUAL_HEADS)}
    with torch.no_grad():
        first = dense_parts(model, video, labels, probes, yes_no, attend=False, appearance=runs)
        second = dense_parts(model, video, labels, probes, yes_no, attend=False, appearance=runs, appearance_layer=2)
        grid = grid_inputs(model, video, None)
        grid.inputs.pop("labels")
        with grid.capturing():
            states = model(**grid.inputs, output_hidden_states=True).hidden_states
        classes = grid.per_row({"video": labels["video"][..., APPEARANCE_COLUMN]}, fill=-1)
        for layer, parts in ((1, first), (2, second)):
            lens = model.lm_head(model.model.language_model.norm(states[layer]))
            sums, counts = appearance_terms(lens, grid.cells, classes, runs)
            assert torch.allclose(parts.appearance_sums, sums, atol=1e-4)
            assert torch.equal(parts.appearance_counts, counts)
    assert torch.equal(first.appearance_counts, second.appearance_counts)  # the same tokens, read at another layer
    assert not torch.allclose(first.appearance_sums, second.appearance_sums)
    assert torch.allclose(first.time_sum, second.time_sum) and torch.allclose(first.probe, second.probe)


@pytest.mark.parametrize("layer, weight, match", [(3, 1.0, "appearance_layer must be 1 to 2"),
                                                  (0, 1.0, "appearance_layer must be 1 to 2"),
                                                  (2, 0.0, "use it with appearance_weight")])
def test_the_appearance_layer_must_be_readable(tmp_path, layer, weight, match) -> None:
    from mmtok.testbed.train import train

    with pytest.raises(ValueError, match=match):
        train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, dense_weight=1.0, appearance_weight=weight,
              appearance_layer=layer,
              work_dir=tmp_path, eval_every=0, log=lambda s: None)


@pytest.mark.parametrize("read_out", ["time", "motion", "appearance"])
def test_video_read_outs_need_video_batches(tmp_path, read_out) -> None:
    from mmtok.testbed.train import train

    with pytest.raises(ValueError, match=f"{read_out} read-out"):
        train("testbed-qwen2vl", size=GRID, steps=1, batch_size=2, modalities=["image"],
              **{f"{read_out}_weight": 1.0}, work_dir=tmp_path, eval_every=0, log=lambda s: None)


def test_a_step_with_every_video_read_out_logs_each_term(tmp_path) -> None:
    import json

    from mmtok.testbed.train import train

    torch.set_num_threads(1)
    run = train("testbed-qwen2vl", size=GRID, steps=1, batch_size=2, lr=1e-4, warmup=0, dense_weight=1.0, time_weight=0.5,
                motion_weight=1.0, appearance_weight=1.0, balanced_probe=True, work_dir=tmp_path, eval_every=0,
                log=lambda s: None)
    assert {k: run["settings"][k] for k in ("time_weight", "motion_weight", "appearance_weight", "balanced_probe")} \
        == {"time_weight": 0.5, "motion_weight": 1.0, "appearance_weight": 1.0, "balanced_probe": True}
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    terms = logged["dense_terms"]
    assert {"time", "motion", "appearance"} <= set(terms) and terms["appearance"] > 0


@pytest.fixture(scope="module")
def deeper():
    """A 3-layer language model (read-outs after layers 1 and 2 are both readable), its processor, image probe
    and "yes" / "no" ids."""
    model, processor = get_spec("testbed-qwen2vl").build(DEEPER, 0)
    model = model.eval()
    probes = {"image": DenseProbe(model.get_input_embeddings(), class_word_ids(processor.tokenizer, IMAGE_HEADS),
                                  IMAGE_HEADS)}
    yes_no = (processor.tokenizer.convert_tokens_to_ids("yes"), processor.tokenizer.convert_tokens_to_ids("no"))
    return model, processor, probes, yes_no


@pytest.fixture(scope="module")
def deeper_images(mixed, deeper):
    """The deeper model, the mixed batch's image rows, their labels, the image probe and "yes" / "no" ids."""
    _, batch, labels, *_ = mixed
    model, _, probes, yes_no = deeper
    return model, split_by_medium(model, batch)[0], labels, probes, yes_no


def test_attention_supervision_on_several_layers_adds_each_layers_rows(deeper_images) -> None:
    from mmtok.testbed.attention_rows import answer_query_positions, query_rows
    from mmtok.testbed.dense import attention_terms
    from mmtok.testbed.media_grid import grid_inputs

    model, image, labels, probes, yes_no = deeper_images
    with torch.no_grad():
        one = {layer: dense_parts(model, image, labels, probes, yes_no, attend=True, attention_layers=(layer,))
               for layer in (1, 2)}
        both = dense_parts(model, image, labels, probes, yes_no, attend=True, attention_layers=(1, 2))
        # layer 2's rows computed by hand: its head 0 at the answer positions, over the image's key cells
        grid = grid_inputs(model, image, None)
        answers = grid.inputs.pop("labels")
        with grid.capturing(), query_rows(model, 2, answer_query_positions(answers)) as rows:
            model(**grid.inputs)
        flags = grid.per_row({"image": labels["image"][..., -2:]})
        by_hand, count = attention_terms(rows, answers, grid.cells, flags[..., 0], flags[..., 1])
    assert one[1].attention_count == one[2].attention_count == count == 2  # both images' answers have key cells
    assert torch.allclose(one[2].attention_sum, by_hand, atol=1e-5)
    assert not torch.allclose(one[1].attention_sum, one[2].attention_sum)  # another layer's head, another loss
    assert both.attention_count == 4
    assert torch.allclose(both.attention_sum, one[1].attention_sum + one[2].attention_sum, atol=1e-5)
    assert torch.allclose(both.answer_sum, one[1].answer_sum) and torch.allclose(both.probe, one[1].probe)


def test_relevance_marks_read_after_several_layers_add_each_layers_terms(deeper_images) -> None:
    from mmtok.testbed.dense import relevance_terms
    from mmtok.testbed.media_grid import grid_inputs

    model, image, labels, probes, yes_no = deeper_images
    with torch.no_grad():
        first = dense_parts(model, image, labels, probes, yes_no, attend=False)
        both = dense_parts(model, image, labels, probes, yes_no, attend=False, relevance_layers=(1, 2))
        grid = grid_inputs(model, image, None)
        grid.inputs.pop("labels")
        with grid.capturing():
            states = model(**grid.inputs, output_hidden_states=True).hidden_states
        lens = model.lm_head(model.model.language_model.norm(states[2]))  # the marks after the second layer
        flags = grid.per_row({"image": labels["image"][..., -2:]})
        sums, counts = relevance_terms(lens, grid.cells, flags[..., 0], *yes_no)
    assert torch.equal(both.relevance_counts, 2 * first.relevance_counts)
    assert torch.allclose(both.relevance_sums, first.relevance_sums + sums, atol=1e-4)
    assert not torch.allclose(sums, first.relevance_sums)


def test_swap_marks_move_the_swap_tokens_from_the_other_class_to_their_own(tmp_path, deeper) -> None:
    from mmtok.testbed.dense import SWAP
    from mmtok.testbed.train import train

    model, processor, probes, yes_no = deeper
    items = [it for it in dataset("image", "train", 40, families=["relation"])
             if bool((batch_labels([it], CELL)[..., -2] == SWAP).any())][:2]
    batch = encode_items(processor, items)
    labels = {"image": batch_labels(items, CELL)}
    with torch.no_grad():
        off = dense_parts(model, batch, labels, probes, yes_no, attend=True, relevance_layers=(1, 2))
        on = dense_parts(model, batch, labels, probes, yes_no, attend=True, relevance_layers=(1, 2), swap_class=True)
        first = dense_parts(model, batch, labels, probes, yes_no, attend=True, swap_class=True)
    swapped = int((labels["image"][..., -2] == SWAP).sum())  # counted once: the second layer's marks only
    assert first.relevance_counts[2] == 0  # the first layer's marks cannot bind: swaps stay other tokens
    assert swapped > 0 and off.relevance_counts[2] == 0 and on.relevance_counts[2] == swapped
    assert on.relevance_counts[0] + swapped == off.relevance_counts[0] and on.relevance_counts[1] == off.relevance_counts[1]
    assert torch.allclose(on.relevance_sums.sum(), off.relevance_sums.sum(), atol=1e-4)
    assert torch.equal(on.attention_sum, off.attention_sum) and torch.equal(on.probe, off.probe)
    run = train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, lr=1e-4, warmup=0, dense_weight=1.0,
                modalities=["image"], swap_marks=True, relevance_layers=[1, 2], family_mix={"relation": 5},
                work_dir=tmp_path / "on", eval_every=0, log=lambda s: None)
    assert run["settings"]["swap_marks"] is True
    with pytest.raises(ValueError, match="swap marks"):
        train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, dense_weight=1.0, modalities=["image"],
              swap_marks=True, work_dir=tmp_path / "first", eval_every=0, log=lambda s: None)


def test_relation_every_word_reaches_the_batches_and_the_second_answer_word(tmp_path, deeper) -> None:
    from mmtok.testbed.train import StepBatches, train

    spec = get_spec("testbed-qwen2vl")
    model, processor, probes, yes_no = deeper
    make = {flag: StepBatches(spec, processor, 4, 0, 0, 1, dense=True, modalities=["image"],
                              family_mix={"relation": 5}, relation_every_word=flag) for flag in (False, True)}
    plain, every = make[False][0]["dense_labels_image"], make[True][0]["dense_labels_image"]
    assert int((plain[..., -1] == 1).sum()) > 0 and torch.equal(every[..., -1], 3 * plain[..., -1])
    items = make[True].items(0)
    batch = encode_items(processor, items)
    with torch.no_grad():
        off = dense_parts(model, batch, {"image": plain}, probes, yes_no, attend=True)
        on = dense_parts(model, batch, {"image": every}, probes, yes_no, attend=True)
    # the same rows, now with the second word's mass on the answering object in each relation row's mean
    assert on.attention_count == off.attention_count and not torch.allclose(on.attention_sum, off.attention_sum)
    assert torch.equal(on.probe, off.probe) and torch.equal(on.relevance_sums, off.relevance_sums)
    run = train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, lr=1e-4, warmup=0, dense_weight=1.0,
                modalities=["image"], relation_every_word=True, family_mix={"relation": 5},
                work_dir=tmp_path / "on", eval_every=0, log=lambda s: None)
    assert run["settings"]["relation_every_word"] is True


def test_lookalike_marks_weigh_a_position_questions_lookalikes_as_their_own_class(tmp_path, deeper) -> None:
    from mmtok.testbed.dense import LOOKALIKE
    from mmtok.testbed.train import train

    model, processor, probes, yes_no = deeper
    items = list(dataset("image", "train", 2, families=["position"]))
    batch = encode_items(processor, items)
    labels = {"image": batch_labels(items, CELL)}
    with torch.no_grad():
        off = dense_parts(model, batch, labels, probes, yes_no, attend=True)
        on = dense_parts(model, batch, labels, probes, yes_no, attend=True, lookalike_class=True)
        both = dense_parts(model, batch, labels, probes, yes_no, attend=True, relevance_layers=(1, 2),
                           lookalike_class=True)
    alike = int((labels["image"][..., -2] == LOOKALIKE).sum())
    assert alike >= 6 and off.relevance_counts[3] == 0 and on.relevance_counts[3] == alike
    assert on.relevance_counts[0] + alike == off.relevance_counts[0] and on.relevance_counts[1] == off.relevance_counts[1]
    assert torch.allclose(on.relevance_sums.sum(), off.relevance_sums.sum(), atol=1e-4)
    assert both.relevance_counts[3] == 2 * alike  # after every relevance layer, the first included
    run = train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, lr=1e-4, warmup=0, dense_weight=1.0,
                modalities=["image"], lookalike_marks=True, family_mix={"position": 5},
                work_dir=tmp_path / "on", eval_every=0, log=lambda s: None)
    assert run["settings"]["lookalike_marks"] is True


@pytest.mark.parametrize("key, layers, weights, match", [
    ("attention_layers", [1, 3], {}, r"reads layer\(s\) \[1, 3\]"),
    ("attention_layers", [1, 2], {"attention_weight": 0.0}, "use it with attention_weight"),
    ("attention_layers", [2, 2], {}, "distinct"),
    ("attention_layers", [-1], {}, "distinct layer indices >= 0"),
    ("relevance_layers", [1, 3], {}, r"relevance_layers must be 1 to 2 .*got \[1, 3\]"),
    ("relevance_layers", [0, 1], {}, "relevance_layers must list distinct layer indices >= 1"),
    ("relevance_layers", [1, 1], {}, "distinct"),
    ("relevance_layers", [1, 2], {"dense_weight": 0.0, "attention_weight": 0.0}, "use it with dense_weight"),
])
def test_supervised_layers_must_exist_and_need_their_read_out(tmp_path, key, layers, weights, match) -> None:
    from mmtok.testbed.train import train

    with pytest.raises(ValueError, match=match):
        train("testbed-qwen2vl", size=DEEPER, steps=1, batch_size=2, **{"dense_weight": 1.0, **weights},
              **{key: layers}, work_dir=tmp_path, eval_every=0, log=lambda s: None)


@pytest.mark.parametrize("key", ["attention_layers", "relevance_layers"])
def test_a_step_on_two_layers_records_them_and_the_default_leaves_no_key(tmp_path, key) -> None:
    from mmtok.testbed.train import train

    torch.set_num_threads(1)
    args = {"size": DEEPER, "steps": 1, "batch_size": 2, "lr": 1e-4, "warmup": 0, "dense_weight": 1.0,
            "modalities": ["image"], "eval_every": 0, "log": lambda s: None}
    two = train("testbed-qwen2vl", **{key: [2, 1]}, work_dir=tmp_path / "two", **args)
    default = train("testbed-qwen2vl", **{key: [1]}, work_dir=tmp_path / "one", **args)
    assert two["settings"][key] == [1, 2] and key not in default["settings"]
    assert two["losses"] == default["losses"]  # the first step's answer loss: the same weights and batch
    assert two["dense_losses"] != default["dense_losses"]
