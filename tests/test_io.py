from palign.core.shards import (
    ShardWriter,
    done_index,
    read_rows,
    reject_row,
    release_rejects,
    shard_files,
)


def test_shards_are_atomic_and_ids_done(tmp_path):
    out = tmp_path / "truncate"
    w = ShardWriter(out, "jsonl", shard_rows=2)
    w.write([{"id": str(i), "probes": [{"k": 1}]} for i in range(5)])
    assert len(list(out.glob("part-*.jsonl"))) == 3
    (out / ".tmp-part-x.jsonl").write_text('{"id": "99"}\n')  # a killed write
    ShardWriter(out / "rejects").write([reject_row("7", "truncate", "why", {"raw": 1})])
    assert set(done_index(out).to_pylist()) == {"0", "1", "2", "3", "4", "7"}
    ShardWriter(out, "jsonl")  # a new writer clears what a killed run left
    assert not list(out.glob(".tmp-*"))


def test_parquet_round_trip(tmp_path):
    rows = [{"id": "a", "probes": [{"k": 2, "verdict": "ENOUGH", "score": None}], "x": 1.5}]
    ShardWriter(tmp_path, "parquet").write(rows)
    assert list(read_rows(tmp_path)) == rows


def test_rejects_record_their_kind():
    assert reject_row("7", "truncate", "why")["kind"] == "row"
    assert reject_row("7", "truncate", "crashed", kind="system")["kind"] == "system"


def write_rejects(out):
    ShardWriter(out / "rejects", shard_rows=2).write([
        reject_row("r1", "truncate", "prompt too long"),
        reject_row("s1", "truncate", "crashed the engine", kind="system"),
        reject_row("s2", "truncate", "crashed the engine", kind="system"),
        {"id": "old", "stage": "truncate", "reason": "before kinds existed", "row": None},
    ])


def test_a_rerun_retries_system_rejects_and_keeps_row_rejects(tmp_path):
    out = tmp_path / "truncate"
    ShardWriter(out).write([{"id": "ok"}])
    write_rejects(out)
    assert release_rejects(out, "system") == 2
    assert set(done_index(out).to_pylist()) == {"ok", "r1", "old"}  # s1 and s2 are pending again
    assert sorted(r["id"] for r in read_rows(out / "rejects_retried")) == ["s1", "s2"]
    assert sorted(r["id"] for r in read_rows(out / "rejects")) == ["old", "r1"]
    assert release_rejects(out, "system") == 0  # nothing left to release


def test_retry_all_and_none(tmp_path):
    write_rejects(tmp_path / "a")
    assert release_rejects(tmp_path / "a", "none") == 0
    assert set(done_index(tmp_path / "a").to_pylist()) == {"r1", "s1", "s2", "old"}
    assert release_rejects(tmp_path / "a", "all") == 4
    assert set(done_index(tmp_path / "a").to_pylist()) == set()
    assert not shard_files(tmp_path / "a" / "rejects")


def test_read_shard_names_a_line_that_is_not_json(tmp_path):
    import pytest

    from palign.core.shards import read_shard

    path = tmp_path / "part-0.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"part-0\.jsonl:3: invalid JSON"):
        read_shard(path)
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n')
    assert read_shard(path) == [{"id": "a"}, {"id": "b"}]
