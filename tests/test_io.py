from palign.stages.io import ShardWriter, done_ids, read_rows, reject_row


def test_shards_are_atomic_and_ids_done(tmp_path):
    out = tmp_path / "truncate"
    w = ShardWriter(out, "jsonl", shard_rows=2)
    w.write([{"id": str(i), "probes": [{"k": 1}]} for i in range(5)])
    assert len(list(out.glob("part-*.jsonl"))) == 3
    (out / ".tmp-part-x.jsonl").write_text('{"id": "99"}\n')  # a killed write
    ShardWriter(out / "rejects").write([reject_row("7", "truncate", "why", {"raw": 1})])
    assert done_ids(out) == {"0", "1", "2", "3", "4", "7"}
    ShardWriter(out, "jsonl")  # a new writer clears what a killed run left
    assert not list(out.glob(".tmp-*"))


def test_parquet_round_trip(tmp_path):
    rows = [{"id": "a", "probes": [{"k": 2, "verdict": "ENOUGH", "score": None}], "x": 1.5}]
    ShardWriter(tmp_path, "parquet").write(rows)
    assert list(read_rows(tmp_path)) == rows
