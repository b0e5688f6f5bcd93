"""Family mixes: the weighted turn order, its item indices, and no item drawn twice across stages."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtok.testbed.data import families, item  # noqa: E402
from mmtok.testbed.family_mix import (  # noqa: E402
    check_mix,
    items_after,
    mixed_index,
    mixed_items,
    parse_mix,
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
