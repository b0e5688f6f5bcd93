"""Family mixes: the weighted turn order, its item indices, and no item drawn twice across stages."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import families, item  # noqa: E402
from mmtok.testbed.family_mix import (  # noqa: E402
    MixPhase,
    check_mix,
    check_switches,
    items_after,
    mix_phases,
    mixed_index,
    mixed_items,
    parse_mix,
    parse_switch,
    phase_at,
    turns,
)


def test_turns_and_indices_known_answer() -> None:
    mix = {"direction": 3}
    assert turns("video", mix) == ["first", "last", "flash_count", "moved", "direction", "direction", "direction",
                                   "change", "when"]
    # a stage whose data offset is 70 items: each video family's first unused index is ceil(70 / 7) = 10
    got = [mixed_index("video", mix, 70, j) for j in range(18)]
    assert [i for f, i in got if f == "direction"] == [10, 11, 12, 13, 14, 15]
    assert [i for f, i in got if f == "first"] == [10, 11]
    assert len(set(got)) == 18
    made = mixed_items("video", mix, 0, 70, 4, 2, "mixed")  # stream indices 4 and 5: direction 10 and 11
    want = [item("video", "train", i, 0, family="direction", form="mixed") for i in (10, 11)]
    assert [(a.family, a.question, a.answer) for a in made] == [(b.family, b.question, b.answer) for b in want]


def _uniform(modality: str, offset: int, steps: int, per: int) -> set[tuple[str, int]]:
    fams = families(modality)
    return {(fams[i % len(fams)], i // len(fams)) for i in range(offset, offset + steps * per)}


def _mixed(modality: str, mix: dict[str, int], offset: int, steps: int, per: int) -> set[tuple[str, int]]:
    return {mixed_index(modality, mix, offset, j) for j in range(steps * per)}


def test_a_chain_of_stages_mixed_or_not_never_repeats_an_item() -> None:
    # image + video stages of batch 16 (8 per modality), as testbed-qwen2vl trains
    media, batch = ["image", "video"], 16
    stages = [None, {"direction": 3, "flash_count": 2}, None, {"count": 4}, {"direction": 2}]
    offset, seen = 0, {m: set() for m in media}
    for k, mix in enumerate(stages):
        steps = 37 + 11 * k
        for m in media:
            drawn = _uniform(m, offset, steps, 8) if not mix or not any(f in mix for f in families(m)) \
                else _mixed(m, mix, offset, steps, 8)
            assert not drawn & seen[m], (k, m)
            seen[m] |= drawn
        settings = {"batch_size": batch, "init_from": {"items": offset}, **({"family_mix": mix} if mix else {})}
        offset = items_after(settings, steps, media)
    # a mixed stage draws its heavy families that much more often
    drawn = _mixed("video", {"direction": 3}, 0, 9, 8)
    assert sum(f == "direction" for f, _ in drawn) == 3 * sum(f == "when" for f, _ in drawn) == 24


def test_bad_mixes_are_refused() -> None:
    assert parse_mix("direction=3, flash_count=2") == {"direction": 3, "flash_count": 2}
    assert parse_mix("none") == parse_mix(" None ") == {}
    with pytest.raises(ValueError, match="family=weight"):
        parse_mix("direction:3")
    with pytest.raises(ValueError, match="not a family"):
        check_mix({"direction": 2}, ["image"])
    with pytest.raises(ValueError, match="whole number"):
        check_mix({"count": 0}, ["image"])


def test_training_with_a_mix_records_it_and_the_next_stage_starts_past_it(tmp_path) -> None:
    from mmtok.testbed.train import train

    torch.set_num_threads(1)
    args = dict(size="tiny", batch_size=4, lr=1e-3, warmup=0, seed=0, eval_every=0, log=lambda s: None)
    mixed = train("testbed-llava", steps=2, family_mix={"count": 3}, work_dir=tmp_path / "a", **args)
    assert mixed["settings"]["family_mix"] == {"count": 3}
    after = train("testbed-llava", steps=1, until=0, init_from=tmp_path / "a", work_dir=tmp_path / "b", **args)
    # 8 items in 10 turns of which 3 are "count": at most 3 count items, indices 0-2; the uniform stream
    # then starts at index 3 of every family (3 * 8 families = 24 items)
    assert after["settings"]["init_from"]["items"] == 24
    with pytest.raises(ValueError, match="not a family"):
        train("testbed-llava", steps=1, family_mix={"direction": 2}, work_dir=tmp_path / "c", **args)


def test_a_switch_within_a_run_draws_each_phase_as_a_stage_would_and_repeats_nothing() -> None:
    media, batch, steps = ["image"], 8, 14
    settings = {"batch_size": batch, "init_from": {"items": 40}, "family_mix": {"count": 2},
                "family_mix_from": [[5, {"relation": 3}], [9, {}]]}
    phases = mix_phases(batch, 40, settings["family_mix"], settings["family_mix_from"], media)
    # phase 0: 40 items in turns of 9 (count twice) from per-family index ceil(40 / 8) = 5 -> ceil(40 / 9) = 5
    # turns use count indices 5..14, so the next phase starts at index 15 of every family (15 * 8 = 120);
    # phase 1: 32 items in turns of 10 (relation thrice) -> relation 15..26, next start 27 * 8 = 216
    assert phases == [MixPhase(0, {"count": 2}, 40), MixPhase(5, {"relation": 3}, 120), MixPhase(9, {}, 216)]
    assert [phase_at(phases, s).start for s in (0, 4, 5, 8, 9, 13)] == [0, 0, 5, 5, 9, 9]
    assert items_after(settings, steps, media) == 216 + 5 * batch
    assert items_after(settings, 5, media) == 120 and items_after(settings, 3, media) == (5 + 3 * 2) * 8  # 3 turns
    seen: set[tuple[str, int]] = set()
    for phase, end in zip(phases, [5, 9, steps], strict=True):
        n = end - phase.start
        drawn = _mixed("image", phase.mix, phase.items_before, n, batch) if phase.mix \
            else _uniform("image", phase.items_before, n, batch)
        assert len(drawn) == n * batch and not drawn & seen, phase
        seen |= drawn
    assert not _uniform("image", items_after(settings, steps, media), 3, batch) & seen  # the next stage's


def test_training_batches_follow_the_switches(tmp_path) -> None:
    from mmtok.testbed.models import get_spec
    from mmtok.testbed.train import StepBatches

    spec = get_spec("testbed-llava")
    _, processor = spec.build("tiny", 0)
    plain = StepBatches(spec, processor, 8, 0, 0, 8, item_offset=40, family_mix={"count": 2})
    switched = StepBatches(spec, processor, 8, 0, 2, 8, item_offset=40, family_mix={"count": 2},
                           family_mix_from=[[5, {"relation": 3}]])

    def key(items):
        return [(it.family, it.question, it.answer) for it in items]

    assert [key(switched.items(i)) for i in range(3)] == [key(plain.items(i)) for i in range(2, 5)]
    later = switched.items(4)  # step 6: the second batch of the relation phase, from per-family index 15
    assert key(later) == key(mixed_items("image", {"relation": 3}, 0, 120, 8, 8, "mixed"))
    assert [it.family for it in later].count("relation") >= 2 and key(later) != key(plain.items(6))


def test_bad_switches_are_refused() -> None:
    assert parse_switch("3300:position=3, relation=3") == (3300, {"position": 3, "relation": 3})
    assert parse_switch("10:none") == (10, {})
    for text in ("position=3", "x:position=3", "-5:count=2", "5:count"):
        with pytest.raises(ValueError, match="STEP:FAMILY|family=weight"):
            parse_switch(text)
    assert check_switches([(5, {"count": 2}), (7, {})], 10, ["image"]) == [[5, {"count": 2}], [7, {}]]
    for switches, message in (([(0, {})], "1 .. 9"), ([(10, {})], "1 .. 9"), ([(5, {}), (5, {})], "increasing"),
                              ([(5, {"direction": 2})], "not a family"), ([(5,)], "pair")):
        with pytest.raises(ValueError, match=message):
            check_switches(switches, 10, ["image"])


def test_training_with_a_switch_records_it_resumes_and_names_it_on_the_card(tmp_path) -> None:
    from mmtok.testbed.train import train

    torch.set_num_threads(1)
    args = dict(size="tiny", batch_size=4, lr=1e-3, warmup=0, seed=0, eval_every=0, log=lambda s: None,
                family_mix={"count": 3}, family_mix_from=[(2, {"relation": 2})])
    whole = train("testbed-llava", steps=3, work_dir=tmp_path / "a", out=tmp_path / "a-out", eval_n=1, **args)
    assert whole["settings"]["family_mix_from"] == [[2, {"relation": 2}]]
    train("testbed-llava", steps=3, until=2, work_dir=tmp_path / "b", **args)
    resumed = train("testbed-llava", steps=3, resume=True, work_dir=tmp_path / "b", **args)
    assert resumed["losses"] == whole["losses"]  # the switch at step 2 is where the resumed part starts
    card = (tmp_path / "a-out" / "README.md").read_text()
    assert "`--family-mix-from 2:relation=2`" in card
    with pytest.raises(ValueError, match="1 .. 2"):
        train("testbed-llava", steps=3, work_dir=tmp_path / "c", **{**args, "family_mix_from": [(3, {})]})
