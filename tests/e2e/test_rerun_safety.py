"""Nothing mixed, nothing lost: a rerun under a changed config is refused before any work,
naming each changed field (``--restart`` redoes the stage and keeps the old output aside);
fields that cannot change a row never count; a stage whose ids in are not its ids out plus its
rejects, each once, fails; shard names never collide, whatever the ids hold. Real Ray, real
files, ``truncate`` with the strategies that need no engine (the fewest rows that show it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from palign.cli import main as palign_main
from palign.config import parse_config
from palign.data.shards import INDEX, read_ids, read_rows
from palign.runtime.spec import WorkerSpec
from palign.runtime.worker import StageWorker

pytestmark = pytest.mark.ray

ROWS = [{"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
         "cot": f"We add {i} and {i}. That makes {2 * i}. So the answer is {2 * i}."}
        for i in range(8)]
NO_COT = {"id": "p-no-cot", "question": "What is 1 + 1?", "answer": "2"}  # a row reject


@pytest.fixture
def run(tmp_path, ray_cluster):
    """A truncate-only config on 4 of 8 rows (strategy full: no engine); returns a function
    that runs `palign run` on it with overrides and gives (exit code, stderr)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS[:3], NO_COT, *ROWS[3:]]))
    cfg = {"run": {"output_dir": str(tmp_path / "out"), "stages": ["truncate"]},
           "ray": {"progress_bars": False}, "data": {"path": str(data), "limit": 4},
           "models": {"student": "smollm2-135m"},
           "truncate": {"strategy": "full", "engine": {"batch_size": 2}},
           "output": {"shard_rows": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def go(*args: str, capsys=None) -> int:
        sets = [a for s in args if "=" in s for a in ("--set", s)]
        flags = [a for a in args if "=" not in a]
        return palign_main(["run", str(path), *sets, *flags])

    go.out = tmp_path / "out"
    return go


def truncated(out: Path) -> dict[str, float]:
    return {r["id"]: r["prefix_ratio"] for r in read_rows(out / "truncate")}


def shards(out: Path) -> set[str]:
    """The data shards of truncate's output and rejects, as named."""
    return {p.name for folder in (out / "truncate", out / "truncate/rejects")
            for p in folder.glob("part-*")}


def test_a_changed_config_is_refused_naming_each_field_and_restart_redoes_it(run, capsys):
    assert run() == 0
    first = truncated(run.out)
    assert len(first) == 3 and set(first.values()) == {1.0}  # strategy full keeps every CoT
    written = shards(run.out)
    capsys.readouterr()

    # the rerun: another strategy and another limit on the same folder
    assert run("truncate.strategy=fixed_ratio", "data.limit=8") == 2
    err = capsys.readouterr().err
    assert "the ingested data in" in err and "data.limit: 4 -> 8" in err
    assert "--restart ingest" in err and "run.output_dir" in err
    assert run("truncate.strategy=fixed_ratio") == 2
    err = capsys.readouterr().err
    assert "truncate's output in" in err and "truncate.strategy: 'full' -> 'fixed_ratio'" in err
    assert "--restart truncate" in err
    assert truncated(run.out) == first  # refused before any work: nothing written

    # fields that cannot change a row never count: the stage resumes, with nothing to do (its
    # row reject, made by the earlier run, still counts as done)
    assert run("truncate.engine.batch_size=3", "truncate.max_reject_share=0.9") == 0
    assert shards(run.out) == written

    assert run("truncate.strategy=fixed_ratio", "truncate.ratio=0.5", "--restart",
               "truncate") == 0
    again = truncated(run.out)
    assert set(again) == set(first) and all(r < 1.0 for r in again.values())
    (aside,) = (run.out / "_aside").iterdir()  # the old output, kept
    assert {r["id"]: r["prefix_ratio"] for r in read_rows(aside / "truncate")} == first
    assert run("truncate.strategy=fixed_ratio", "truncate.ratio=0.5") == 0  # resumes now


def test_a_stage_with_an_id_twice_or_an_index_without_data_fails_naming_them(run, capsys):
    assert run() == 0
    folder = run.out / "truncate"
    index = sorted((folder / INDEX).glob("part-*.parquet"))[0]
    data = folder / index.name.removesuffix(".parquet")
    token = data.name.split("-")[1]
    copy = data.with_name(f"part-{token}-{'f' * 20}.jsonl")
    shutil.copy(data, copy)  # the same rows committed by the same run under a second name
    shutil.copy(index, folder / INDEX / (copy.name + ".parquet"))
    capsys.readouterr()
    assert run() == 1
    err = capsys.readouterr().err
    row_id = json.loads(data.read_text().splitlines()[0])["id"]
    assert "written more than once" in err and repr(row_id) in err and copy.stem in err

    copy.unlink()
    (folder / INDEX / (copy.name + ".parquet")).unlink()
    data.unlink()  # an index whose data is gone: its ids count as done, yet cannot be read
    assert run() == 1
    assert "have an index and no data" in capsys.readouterr().err


def test_ids_whose_newline_joined_texts_collide_are_each_written_once(tmp_path):
    """Two batches, {"a\\nb", "c"} and {"a", "b\\nc"}: joined with newlines, both read
    "a\\nb\\nc"; each batch's shard name must still be its own."""
    cfg = parse_config({"run": {"output_dir": str(tmp_path), "stages": ["truncate"]},
                        "data": {"path": "unused.jsonl"}, "models": {"student": "unused"},
                        "truncate": {"strategy": "full"}})
    worker = StageWorker(WorkerSpec.of(cfg, "truncate"))
    row = {k: v for k, v in ROWS[0].items() if k != "id"}
    for ids in (["a\nb", "c"], ["a", "b\nc"]):
        out = worker({"record": [json.dumps({**row, "id": i}) for i in ids]})
        assert out["ok"] == [2]
    assert read_ids(tmp_path / "truncate") == {"a\nb", "c", "a", "b\nc"}
