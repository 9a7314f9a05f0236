from palign.data.shards import (
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

    from palign.data.shards import read_shard

    path = tmp_path / "part-0.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"part-0\.jsonl:3: invalid JSON"):
        read_shard(path)
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n')
    assert read_shard(path) == [{"id": "a"}, {"id": "b"}]


def test_a_digest_serves_the_indexes_it_holds_as_they_are_now(tmp_path):
    """``write_digests`` gathers a folder's indexes into one file; readers take from it the
    index files listed with the size and time it recorded, and read the others (added,
    rewritten) themselves; a removed one is gone."""
    import os

    from palign.data.digest import count_rows, read_index, write_digest, write_digests
    from palign.data.layout import DIGEST, INDEX
    from palign.data.shards import write_shard

    out = tmp_path / "truncate"
    for i in range(4):  # the first shard's ratio column is all null: another column type
        write_shard(out, f"part-{i}", [{"id": f"r{i}-{j}"} for j in range(3)], "jsonl",
                    {"prefix_ratio": [None if i == 0 else i / 10] * 3})
    write_shard(out, "part-empty", [], "jsonl", {"prefix_ratio": []})
    write_rejects(out)

    def rows(folder=out):
        t = read_index(folder, ("id", "prefix_ratio"))
        return sorted(zip(t["id"].to_pylist(), t["prefix_ratio"].to_pylist(),
                          t["_file"].cast("string").to_pylist()))

    before, rejects_before = rows(), rows(out / "rejects")
    write_digests(out)
    assert [p.name for p in (out / INDEX).glob(DIGEST + "*")] == [DIGEST + "-000000.parquet"]
    assert list((out / "rejects" / INDEX).glob(DIGEST + "*"))
    assert rows() == before and rows(out / "rejects") == rejects_before
    assert count_rows(out) == 12 and count_rows(out / "rejects") == 4
    assert write_digest(out) == 5  # up to date: every index file, the empty one too

    # What a reader gets for a file the digest holds is the digest's copy: an index changed
    # behind its back with the same size and time still reads as recorded ...
    one = out / INDEX / "part-1.jsonl.parquet"
    stat = one.stat()
    write_shard(out, "part-1", [{"id": "r1-X"}, {"id": "r1-1"}, {"id": "r1-2"}], "jsonl",
                {"prefix_ratio": [0.1] * 3})
    assert one.stat().st_size == stat.st_size
    os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "r1-0" in {r[0] for r in rows()}
    # ... while one with another time is read again, a new one is read, a removed one is gone.
    os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    write_shard(out, "part-9", [{"id": "new"}], "jsonl", {"prefix_ratio": [0.9]})
    (out / INDEX / "part-2.jsonl.parquet").unlink()
    expected = sorted([r for r in before if r[2] not in ("part-1.jsonl", "part-2.jsonl")]
                      + [(i, 0.1, "part-1.jsonl") for i in ("r1-X", "r1-1", "r1-2")]
                      + [("new", 0.9, "part-9.jsonl")])
    assert rows() == expected and count_rows(out) == 10
    assert write_digest(out) == 5 and rows() == expected and count_rows(out) == 10

    # Released rejects rewrite their indexes: the digest is dropped first, then rebuilt.
    assert release_rejects(out, "system") == 2
    assert not list((out / "rejects" / INDEX).glob(DIGEST + "*"))
    write_digests(out)
    assert [r[0] for r in rows(out / "rejects")] == ["old", "r1"]
    assert set(done_index(out).to_pylist()) == {r[0] for r in expected} | {"old", "r1"}


def test_digest_parts_are_added_and_dropped_never_grown(tmp_path):
    """The digest comes in parts of about ``part_rows`` rows: indexes written since the last
    digest make a new part, a part holding an index since rewritten is dropped and what it held
    gathered again, and no index is ever read twice (a copied part claims nothing)."""
    import shutil

    from palign.data.digest import count_rows, read_index, write_digest
    from palign.data.layout import DIGEST, INDEX
    from palign.data.shards import write_shard

    out = tmp_path / "stage"
    want: dict[str, list[str]] = {}

    def shard(i: int, tag: str = "") -> None:
        ids = [f"r{i}-{j}{tag}" for j in range(3)]
        write_shard(out, f"part-{i:02d}", [{"id": x} for x in ids], "jsonl", {"x": [i] * 3})
        want[f"part-{i:02d}.jsonl"] = ids

    def parts() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in sorted((out / INDEX).glob(DIGEST + "*"))}

    def check() -> None:
        t = read_index(out, ("id",))
        got = sorted(zip(t["_file"].cast("string").to_pylist(), t["id"].to_pylist()))
        assert got == sorted((f, i) for f, ids in want.items() for i in ids)
        assert count_rows(out) == sum(len(ids) for ids in want.values())

    for i in range(10):
        shard(i)
    assert write_digest(out, threads=1, part_rows=6) == 10  # read 4 indexes at a time
    first = parts()
    assert list(first) == [f"{DIGEST}-00000{k}.parquet" for k in range(3)]
    check()
    shard(10)
    shard(11)
    assert write_digest(out, threads=1, part_rows=6) == 12
    assert parts() == {**first, f"{DIGEST}-000003.parquet": parts()[f"{DIGEST}-000003.parquet"]}
    check()
    shard(5, "-again")  # part 1 (indexes 4-7) no longer holds what part-05 is
    check()
    assert write_digest(out, threads=1, part_rows=6) == 12
    assert sorted(parts()) == [f"{DIGEST}-00000{k}.parquet" for k in (0, 2, 3, 4)]
    check()
    shutil.copy(out / INDEX / f"{DIGEST}-000000.parquet", out / INDEX / f"{DIGEST}-000009.parquet")
    check()  # the copy's indexes are the first part's already: taken once
    assert write_digest(out, threads=1, part_rows=6) == 12
    assert f"{DIGEST}-000009.parquet" not in parts()
    check()
