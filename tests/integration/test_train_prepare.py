"""palign.train.prepare: the align rows tokenised and packed once into token shards and a unit
table; a rank's reads give exactly the packs (or examples) the in-memory path builds; windows are
done once, a killed preparation continues, rejects are written once; new settings prepare anew.
In process here (the Ray Data path runs in tests/integration/test_train.py and the s3 pipeline
test)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from synthetic_rows import addition_rows

import palign.train.prepare as prepare_module
from palign.config import Config, parse_config
from palign.data import storage
from palign.data.shards import REJECTS, ShardWriter, read_rows
from palign.train.data import collate_packs, example_from_row, pack, pad_batch
from palign.train.prepare import NoTrainableRows, plan_windows, prepare
from palign.train.units import PLAN, WINDOWS, UnitReader

LONG_ID = "row-overlong"


def align_rows(n: int) -> list[dict]:
    return addition_rows(n, seed=1, max_steps=12, id_width=3, answer=False) + [
        {"id": LONG_ID, "question": "Sum these.",
         "target": " ".join(["one plus one is two."] * 200)},
        {"id": "row-no-target", "question": "Q?", "target": None}]


def config(tmp: Path, rows: list[dict], **train) -> Config:
    out = tmp / "out"
    if not (out / "align").exists():
        shuffled = rows[:]
        random.Random(2).shuffle(shuffled)  # shard layout must not matter within a window
        ShardWriter(out / "align", "jsonl", 7).write(shuffled)
    return parse_config({
        "run": {"output_dir": str(out), "stages": ["train"]},
        "data": {"path": str(tmp / "unused.jsonl")},
        "models": {"student": "smollm2-135m"},
        "train": {"seq_len": 256, **train},
    })


def collated(units, pad_id):
    if hasattr(units[0], "position_ids"):
        return collate_packs(units)
    return pad_batch(units, pad_id)


@pytest.mark.parametrize("packing", [True, False])
def test_one_window_gives_the_in_memory_units(tmp_path, tokenizer, packing, monkeypatch):
    monkeypatch.setattr(prepare_module, "UNIT_GROUP", 4)  # units read across row groups
    rows = align_rows(30)
    cfg = config(tmp_path, rows, packing=packing, pack_window=10_000)
    prepared = prepare(cfg, use_ray=False)
    reader = UnitReader(prepared.folder, max_groups=2)
    examples = [example_from_row(tokenizer, r, 256) for r in sorted(rows[:30],
                                                                    key=lambda r: r["id"])]
    expected = pack(examples, 256, prepared.pad_id) if packing else examples
    assert len(reader) == len(expected) == prepared.n_units
    got = [reader.unit(u) for u in reversed(range(len(reader)))][::-1]
    for a, b in zip(got, expected):
        for key, value in collated([a], prepared.pad_id).items():
            assert torch.equal(value, collated([b], prepared.pad_id)[key]), key
    assert prepared.rows_used == 30 and prepared.rows_rejected == 2
    assert reader._group_rows == 4 and len(reader.windows) == 1
    reasons = {r["id"]: r["reason"] for r in read_rows(Path(cfg.stage_dir("train")) / REJECTS)}
    assert "max_len 256" in reasons[LONG_ID] and "no question or target" in reasons["row-no-target"]
    reader.close()


def test_windows_once_a_killed_preparation_continues_and_rejects_once(tmp_path):
    rows = align_rows(60)
    cfg = config(tmp_path, rows, pack_window=15)
    windows = plan_windows(cfg.stage_dir("align"), 15)
    assert len(windows) > 2 and sum(len(p) for _, p in windows) == len(list(
        (Path(cfg.stage_dir("align")) / "_index").iterdir()))
    first = prepare(cfg, use_ray=False)
    folder = Path(first.folder)
    assert first.rows_used == 60 and first.rows_rejected == 2
    units = sorted(p.name for p in (folder / WINDOWS).iterdir())
    # Killed midway: one window's commit and the plan are missing. Only that window is redone.
    (folder / PLAN).unlink()
    (folder / WINDOWS / f"{windows[1][0]}.parquet").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (folder / WINDOWS).iterdir()}
    again = prepare(cfg, use_ray=False)
    assert again == first
    after = {p.name: p.stat().st_mtime_ns for p in (folder / WINDOWS).iterdir()}
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {f"{windows[1][0]}.parquet", f"{windows[1][0]}.bin"}
    assert sorted(after) == units
    ids = [r["id"] for r in read_rows(Path(cfg.stage_dir("train")) / REJECTS)]
    assert sorted(ids) == sorted([LONG_ID, "row-no-target"])
    # Done: found again without any work.
    assert prepare(cfg, use_ray=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in (folder / WINDOWS).iterdir()} == after


def test_new_settings_prepare_anew_and_replace_the_old(tmp_path):
    rows = align_rows(20)
    old = prepare(config(tmp_path, rows), use_ray=False)
    new = prepare(config(tmp_path, rows, seq_len=2048), use_ray=False)
    assert new.key != old.key and new.rows_rejected == 1  # the long row fits now
    assert not storage.exists(old.folder)
    rejects = [r["id"] for r in read_rows(Path(tmp_path / "out/train") / REJECTS)]
    assert rejects == ["row-no-target"]


def test_nothing_to_train_on_is_an_error(tmp_path):
    rows = [{"id": "a", "question": "Q?", "target": None}]
    with pytest.raises(NoTrainableRows, match="all 1 aligned rows were rejected"):
        prepare(config(tmp_path, rows), use_ray=False)
    empty = tmp_path / "empty"
    cfg = parse_config({"run": {"output_dir": str(empty)}, "models": {"student": "smollm2-135m"},
                        "data": {"path": str(tmp_path / "x.jsonl")}})
    with pytest.raises(NoTrainableRows, match="no aligned rows"):
        prepare(cfg, use_ray=False)
