import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palign.config import DataSection
from palign.data.ingest import question_id, read_problems

GOOD = [
    {"id": "a", "question": "What is 1+1?", "answer": "2", "cot": "One plus one. It is 2."},
    {"question": "What is 2+2?", "answer": 4},  # no id, numeric answer, no CoT
]
BAD = [
    ({"id": "b1", "answer": "3"}, "missing question"),
    ({"id": "b2", "question": "   ", "answer": "3"}, "is empty"),
    ({"id": "b3", "question": ["not", "text"], "answer": "3"}, "not a string"),
    ({"id": "b4", "question": "Q?", "answer": "3", "cot": 17}, "'cot' is not a string"),
    ({"id": "b5", "question": "Q?", "answer": "3", "cot": "x" * 500}, "over data.max_cot_chars"),
    ({"id": "b6", "question": "Q?"}, "missing answer"),
    ({"id": "a", "question": "Again?", "answer": "1"}, "duplicate id"),
    ({"id": {"x": 1}, "question": "Q?", "answer": "1"}, "non-empty string or integer"),
    ([1, 2, 3], "not an object"),
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_jsonl_good_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, GOOD + [row for row, _ in BAD], extra_lines=["{broken json", ""])
    problems, rejects = read_problems(DataSection(path=str(path), max_cot_chars=100))
    assert [p["id"] for p in problems] == ["a", question_id("What is 2+2?")]
    assert problems[1] == {"id": question_id("What is 2+2?"), "question": "What is 2+2?",
                           "answer": "4", "cot": None}
    assert len(rejects) == len(BAD) + 1
    for rej, (_, reason) in zip(rejects, BAD):
        assert reason in rej.reason
    assert rejects[0].id == "b1"
    assert rejects[-1].id == "p.jsonl:12" and "invalid JSON" in rejects[-1].reason


def test_hash_id_is_stable_and_field_names_configurable(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"problem": "Find x.", "solution": "5", "trace": "x is 5."}])
    data = DataSection(path=str(path),
                       fields={"id": "uid", "question": "problem", "answer": "solution",
                               "cot": "trace"})
    problems, rejects = read_problems(data)
    assert not rejects
    assert problems[0]["id"] == question_id("Find x.") == read_problems(data)[0][0]["id"]
    assert problems[0]["cot"] == "x is 5."


def test_parquet_and_datasets_folder(tmp_path):
    rows = [{"id": str(i), "question": f"Q{i}?", "answer": str(i), "cot": None} for i in range(5)]
    rows[3]["question"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    problems, rejects = read_problems(DataSection(path=str(tmp_path / "p.parquet")))
    assert [p["id"] for p in problems] == ["0", "1", "2", "4"]
    assert [r.id for r in rejects] == ["3"]

    import datasets  # a hard dependency: missing, this fails (never skips)

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="data.split"):
        read_problems(DataSection(path=str(tmp_path / "hf")))
    problems, rejects = read_problems(DataSection(path=str(tmp_path / "hf"), split="train",
                                                  limit=3))
    assert len(problems) + len(rejects) == 3


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        read_problems(DataSection(path=str(tmp_path / "nope.jsonl")))


# -- fuzz: whatever the bytes, every line is a problem or a reject with a reason -----------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)
ODD_TEXT = st.sampled_from([
    "", "   ", "x" * 300_000, "nul\x00inside", "lone \ud800 surrogate", "\udfff", "\ufeffbom",
    "crlf\r\nin text", "What is 2+2?", "ü ∑ 数学",
])
FIELD = st.one_of(ODD_TEXT, JSON_VALUES, st.integers(-3, 3))
ROW = st.fixed_dictionaries(
    {}, optional={"id": st.sampled_from(["a", "b", "", " ", 7, True, 1.5, None, {"x": 1}]),
                  "question": FIELD, "answer": FIELD, "cot": FIELD})
MANGLE = st.sampled_from(["none", "bom", "crlf", "cut", "bad-utf8", "nul-byte", "cr-inside",
                          "not-object", "deep"])


def encode_line(row: dict, how: str) -> bytes:
    if how == "not-object":
        return json.dumps(list(row.values()), ensure_ascii=True, default=str).encode()
    if how == "deep":
        return b"[" * 5000 + b"]" * 5000
    line = json.dumps(row, ensure_ascii=True, default=str).encode()  # escapes surrogates
    return {"none": line, "bom": b"\xef\xbb\xbf" + line, "crlf": line + b"\r",
            "cut": line[: len(line) // 2], "bad-utf8": line[:1] + b"\xff\xc3" + line[1:],
            "nul-byte": line + b"\x00", "cr-inside": line[:1] + b"\r" + line[1:]}[how]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(ROW, MANGLE), max_size=12), st.booleans())
def test_fuzzed_jsonl_never_crashes_and_accounts_for_every_line(tmp_path_factory, rows, blank):
    from palign.data.shards import read_rows
    from palign.runtime.source import ingest_here

    tmp = tmp_path_factory.mktemp("fuzz")
    lines = [encode_line(row, how) for row, how in rows] + ([b"", b"  "] if blank else [])
    (tmp / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = DataSection(path=str(tmp / "data.jsonl"), max_cot_chars=200_000)

    counts = ingest_here(str(tmp / "ingest"), data, shard_rows=5)  # reads, validates, writes
    problems, _ = read_problems(data)  # the same source read in one go, in memory

    rejects = list(read_rows(tmp / "ingest" / "rejects"))
    written = list(read_rows(tmp / "ingest"))
    rows_in = sum(1 for i, line in enumerate(lines)
                  if (line[3:] if i == 0 and line.startswith(b"\xef\xbb\xbf") else line)
                  .removesuffix(b"\r").strip())
    assert len(written) + len(rejects) == rows_in  # none lost, none made up
    assert written == problems
    assert counts == {"rows": len(written), "rejects": len(rejects)}
    assert len({p["id"] for p in written}) == len(written)  # ids are unique
    for p in written:
        assert all(isinstance(p[k], str) and p[k].strip() for k in ("id", "question", "answer"))
        assert p["cot"] is None or isinstance(p["cot"], str)
    for r in rejects:
        assert r["id"] and r["reason"] and r["stage"] == "ingest" and r["kind"] == "row"


def test_sharded_ingest_settles_limits_and_repeats_across_files(tmp_path):
    """Each file is read by its own task; the limit (in file order) and ids repeated across
    files are settled afterwards from the indexes alone, as one reading in order would."""
    from palign.data.digest import read_index
    from palign.data.shards import read_rows
    from palign.runtime.source import ingest_here

    src = tmp_path / "src"
    src.mkdir()
    for f, ids in enumerate([["a", "b", "c"], ["b", "d", "bad"], ["a", "e"]]):
        lines = [json.dumps({"id": i, "question": f"Q {i}?", "answer": "1"} if i != "bad"
                            else {"id": i}) for i in ids]
        (src / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    for limit in (None, 5, 7):
        data = DataSection(path=str(src), limit=limit)
        out = str(tmp_path / f"ingest-{limit}")
        ingest_here(out, data, shard_rows=2)
        want, want_rejects = read_problems(data)
        assert list(read_rows(out)) == want
        got_rejects = list(read_rows(tmp_path / f"ingest-{limit}" / "rejects"))
        assert sorted((r["id"], r["reason"]) for r in got_rejects) == sorted(
            (r.id, r.reason) for r in want_rejects)
        assert read_index(out, ("has_cot",))["has_cot"].to_pylist() == [False] * len(want)
    dup = [r for r in read_rows(tmp_path / "ingest-None" / "rejects") if r["id"] == "b"]
    assert dup and dup[0]["reason"] == "duplicate id (first seen at part-0.jsonl:2)"


def test_iter_jsonl_numbers_lines_and_yields_unreadable_lines_in_place(tmp_path):
    """The one JSONL reader (ingest, shards and `palign grade` use it): line numbers count the
    blank lines it skips; a BOM and CRLF endings are dropped; bad UTF-8 or JSON never raises."""
    from palign.data.lines import Unreadable, iter_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n  \n{broken\n\xff\xfe{"b": 2}\n[1, 2]')
    rows = list(iter_jsonl(path))
    assert [n for n, _ in rows] == [1, 4, 5, 6]
    assert rows[0][1] == {"a": 1} and rows[3][1] == [1, 2]
    assert isinstance(rows[1][1], Unreadable)
    assert rows[1][1].reason.startswith("invalid JSON") and rows[1][1].raw == "{broken"
    assert rows[2][1].reason.startswith("not valid UTF-8")


def test_a_finished_ingest_that_does_not_hold_its_rows_fails_the_run(tmp_path):
    """An ingest folder marked finished whose indexes lack the rows its marker counts (an older
    palign wrote data without indexes, or a file went missing) is never taken as zero rows."""
    from palign.common.failures import StageFailed
    from palign.config import parse_config
    from palign.data import fingerprint
    from palign.runtime.fingerprints import ingest_fingerprint
    from palign.runtime.runner import ingest_once
    from palign.runtime.source import ingest_here

    write_jsonl(tmp_path / "p.jsonl", GOOD)
    data = DataSection(path=str(tmp_path / "p.jsonl"))
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run")}, "data": data.model_dump(),
                        "models": {"student": "smollm2-135m"}})
    folder = str(tmp_path / "run" / "ingest")
    ingest_here(folder, data, shard_rows=10)
    fingerprint.write(folder, ingest_fingerprint(data))  # made under this data section
    ingest_once(cfg, folder, data)  # finished and whole: kept as it is
    for index in (tmp_path / "run" / "ingest" / "_index").iterdir():
        index.unlink()
    with pytest.raises(StageFailed, match="marked finished with 2 rows but its indexes hold 0"):
        ingest_once(cfg, folder, data)


# -- large files in pieces: a task each, the same result as reading the file whole ---------

@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([b"", b"a", b"bc\r", b'{"x": 1}', b"\xef\xbb\xbf{}", b"4" * 40]),
                max_size=12),
       st.booleans(), st.lists(st.integers(0, 400), max_size=5), st.integers(1, 9))
def test_byte_ranges_that_tile_a_file_give_each_line_to_exactly_one(tmp_path_factory, lines,
                                                                    newline_at_end, cuts, chunk):
    """However a file is cut (at a line's first byte, inside a line, just after a \\n, past
    the end) and whatever the read chunk, the ranges' lines are the file's lines, in order,
    each with the byte offset it starts at."""
    from palign.data.lines import iter_line_range, iter_lines

    data = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
    path = tmp_path_factory.mktemp("ranges") / "x.jsonl"
    path.write_bytes(data)
    want, at = [], 0
    for line in data.split(b"\n"):
        want.append((at, line))
        at += len(line) + 1
    if want and not want[-1][1]:
        want.pop()  # what follows the last \n
    assert [line for _, line in want] == list(iter_lines(path))
    bounds = sorted({0, *(c % (len(data) + 2) for c in cuts)})
    got = [pair for start, stop in zip(bounds, [*bounds[1:], None])
           for pair in iter_line_range(path, start, stop, chunk=chunk)]
    assert got == want


def big_source(n: int = 2600) -> list[dict]:
    """About 2.9 MB of rows: 1 KB CoTs (that do not compress), a few bad rows, ids repeated
    far apart."""
    import random

    rows: list = [{"id": f"r{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
                   "cot": f"Add one to {i}. " + random.Random(i).randbytes(500).hex()}
                  for i in range(n)]
    rows[7] = {"question": "", "answer": "1"}  # no id: named by its position
    rows[1400] = {"id": "r3", "question": "Again?", "answer": "1"}  # repeats r3
    rows[2500] = {"id": "r1401", "question": "Again?", "answer": "1"}  # repeats a later id
    rows[2001] = [1, 2]  # no id, not an object
    return rows


def test_a_large_file_read_in_pieces_ingests_as_when_read_whole(tmp_path):
    """JSONL cut by byte range and Parquet by row groups (data.piece_mib 1 on about 3 MB): the
    problems, their order, the limit and the repeated ids across pieces all come out as one
    reading in order gives; only the position of a JSONL row is its byte offset there."""
    import re

    from palign.data.ingest import source_pieces
    from palign.data.shards import read_rows
    from palign.runtime.source import ingest_here

    rows = big_source()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "big.jsonl").write_text(text)
    parquet_rows = [r for r in rows if isinstance(r, dict)]
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "big.parquet",
                   row_group_size=200)
    (tmp_path / "folder").mkdir()  # a large file and a small one after it
    (tmp_path / "folder" / "a.jsonl").write_text(text.replace("big.jsonl", "a.jsonl"))
    write_jsonl(tmp_path / "folder" / "b.jsonl", [{"id": "r5", "question": "Q?", "answer": "1"},
                                                  [1]])
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line.encode()))

    def as_pieces(text: str) -> str:  # line n of the whole reading is the byte offset there
        return re.sub(r"(big|a)\.jsonl:(\d+)",
                      lambda m: f"{m[1]}.jsonl@{offsets[int(m[2]) - 1]}", text)

    for name, n in (("big.jsonl", 3), ("big.parquet", 3), ("folder", 4)):
        pieces = source_pieces(DataSection(path=str(tmp_path / name), piece_mib=1), 1 << 20)
        assert [p.number for p in pieces] == list(range(n))
        assert [p.whole for p in pieces] == [False] * 3 + [True] * (n - 3)
        for limit in (None, 1500):
            data = DataSection(path=str(tmp_path / name), piece_mib=1, limit=limit)
            out = tmp_path / f"ingest-{name}-{limit}"
            counts = ingest_here(str(out), data, shard_rows=100)
            want, want_rejects = read_problems(data)
            assert list(read_rows(out)) == want
            got_rejects = sorted((r["id"], r["reason"]) for r in read_rows(out / "rejects"))
            assert got_rejects == sorted((as_pieces(r.id), as_pieces(r.reason))
                                         for r in want_rejects)
            assert counts == {"rows": len(want), "rejects": len(want_rejects)}
            assert len(want_rejects) == (2 if limit else {"big.jsonl": 4, "big.parquet": 3,
                                                          "folder": 6}[name])
    dup = {r["id"]: r["reason"] for r in read_rows(tmp_path / "ingest-big.jsonl-None/rejects")}
    assert dup["r3"] == f"duplicate id (first seen at big.jsonl@{offsets[3]})"
    assert f"big.jsonl@{offsets[7]}" in dup and f"big.jsonl@{offsets[2001]}" in dup
    dup = {r["id"]: r["reason"] for r in read_rows(tmp_path / "ingest-folder-None/rejects")}
    assert dup["r5"] == f"duplicate id (first seen at a.jsonl@{offsets[5]})"
    assert "b.jsonl:2" in dup  # a small file keeps its line numbers


def test_the_runner_reads_a_large_file_with_a_task_per_piece(tmp_path, ray_cluster):
    """The Ray Data path (``ingest_once``): the pieces go through tasks and end as the one-
    process ingest does."""
    from palign.config import parse_config
    from palign.data.shards import read_rows
    from palign.runtime.runner import ingest_once
    from palign.runtime.source import ingest_here

    (tmp_path / "big.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in big_source()))
    data = DataSection(path=str(tmp_path / "big.jsonl"), piece_mib=1)
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run")},
                        "data": data.model_dump(), "models": {"student": "smollm2-135m"},
                        "output": {"shard_rows": 100}})
    ingest_once(cfg, str(tmp_path / "run" / "ingest"), data)
    ingest_here(str(tmp_path / "here"), data, shard_rows=100)
    for sub in ("", "rejects"):
        assert list(read_rows(tmp_path / "run" / "ingest" / sub)) == \
            list(read_rows(tmp_path / "here" / sub))
    assert len(list(read_rows(tmp_path / "here"))) == 2600 - 4


# -- bad input: ids that are not one line of text, lines over the cap ----------------------

def test_ids_with_control_characters_or_over_the_length_cap_are_rejected_not_rewritten(
        tmp_path):
    """An id is one line of printable text of at most ``MAX_ID_CHARS`` characters: one holding
    a control character (\\n, \\r, \\t, \\0, DEL, NEL) or a line separator, or a longer one, is
    a row reject named by the row's position (never by the bad id), in the one-process and
    the sharded ingest alike; an id at the cap, and one with inner spaces, are kept as given."""
    from palign.data.ingest import MAX_ID_CHARS
    from palign.data.shards import read_rows
    from palign.runtime.source import ingest_here

    bad = {"a\nb": "U+000A", "a\rb": "U+000D", "tab\there": "U+0009", "nul\x00": "U+0000",
           "del\x7f": "U+007F", "nel\x85": "U+0085", "ls\u2028": "U+2028",
           "x" * (MAX_ID_CHARS + 1): f"has {MAX_ID_CHARS + 1} characters"}
    good = ["y" * MAX_ID_CHARS, "with inner space", 7]
    rows = [{"id": i, "question": f"Q{n}?", "answer": "1"} for n, i in enumerate([*bad, *good])]
    rows.append({"id": "no\nquestion", "answer": "1"})  # the id is what is reported
    write_jsonl(tmp_path / "p.jsonl", rows)
    data = DataSection(path=str(tmp_path / "p.jsonl"))
    problems, rejects = read_problems(data)
    assert [p["id"] for p in problems] == ["y" * MAX_ID_CHARS, "with inner space", "7"]
    assert [r.id for r in rejects] == [f"p.jsonl:{n}" for n in (*range(1, 9), 12)]
    for rej, why in zip(rejects, [*bad.values(), "U+000A"]):
        assert rej.reason.startswith("field 'id' ") and why in rej.reason, rej.reason
    counts = ingest_here(str(tmp_path / "out"), data, shard_rows=4)
    assert counts == {"rows": 3, "rejects": 9}
    assert [r["id"] for r in read_rows(tmp_path / "out")] == [p["id"] for p in problems]
    assert sorted(r["id"] for r in read_rows(tmp_path / "out" / "rejects")) == \
        sorted(r.id for r in rejects)


def test_a_line_over_the_cap_is_rejected_unread_with_its_position(tmp_path):
    """``data.max_line_mib``: a line longer is a reject naming its position and the cap, the
    lines around it are read, whether the file is read whole or in pieces by byte range (the
    long line starts in one piece and runs through the next) or ends without a newline."""
    from palign.data.shards import read_rows
    from palign.runtime.source import ingest_here

    cap = 1 << 20
    long_row = json.dumps({"id": "long", "question": "x" * cap, "answer": "1"})
    lines = [json.dumps({"id": "a", "question": "Q?", "answer": "1"}), long_row,
             json.dumps({"id": "b", "question": "Q?", "answer": "2"}), long_row]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))  # the last line has no \n
    reason = f"line over {cap} bytes ({len(long_row)} bytes): not read"
    data = DataSection(path=str(tmp_path / "p.jsonl"), max_line_mib=1, piece_mib=1)
    problems, rejects = read_problems(data)
    assert [p["id"] for p in problems] == ["a", "b"]
    assert [(r.id, r.reason, r.row) for r in rejects] == [
        ("p.jsonl:2", reason, None), ("p.jsonl:4", reason, None)]
    counts = ingest_here(str(tmp_path / "out"), data, shard_rows=10)  # 2 pieces of 1 MiB
    assert counts == {"rows": 2, "rejects": 2}
    assert [r["id"] for r in read_rows(tmp_path / "out")] == ["a", "b"]
    starts = [0, len(lines[0]) + 1, len(lines[0]) + len(long_row) + 2]
    starts.append(starts[-1] + len(lines[2]) + 1)
    assert sorted((r["id"], r["reason"]) for r in read_rows(tmp_path / "out" / "rejects")) == \
        sorted([(f"p.jsonl@{starts[1]}", reason), (f"p.jsonl@{starts[3]}", reason)])
    # the same file under the default cap is read in full
    assert len(read_problems(DataSection(path=str(tmp_path / "p.jsonl")))[0]) == 3


def test_a_long_line_is_read_past_in_bounded_memory(tmp_path):
    """Linear, not quadratic: a 24 MB line without a newline, read in 64 KiB chunks under a
    4 KiB cap, is never accumulated (the old reader grew it by ``rest + block``, copying it
    once per chunk and holding it whole): Python's allocations stay under cap + a few chunks,
    and the line comes out as a ``LongLine`` of its exact size, the next line read as usual.
    The public line readers raise ``LineTooLong`` naming the line."""
    import tracemalloc

    from palign.data.lines import (
        LineTooLong,
        LongLine,
        Unreadable,
        _file_lines,
        iter_jsonl,
        iter_line_range,
        iter_lines,
    )

    size, chunk, cap = 24 << 20, 64 << 10, 4 << 10
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(b"7" * (1 << 20))
        f.write(b'\n{"after": 1}\n')
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        lines = list(_file_lines(path, chunk, cap))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [LongLine(size, cap), b'{"after": 1}']
    assert peak < cap + 4 * chunk, peak
    assert list(iter_jsonl(path, max_line=cap)) == [
        (1, Unreadable(f"line over {cap} bytes ({size} bytes): not read")),
        (2, {"after": 1})]
    with pytest.raises(LineTooLong, match="line 1: line over 4096 bytes"):
        list(iter_lines(path, chunk, max_line=cap))
    with pytest.raises(LineTooLong, match="line at byte 0: line over"):
        list(iter_line_range(path, 0, None, chunk, max_line=cap))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([b"", b"a", b"bc\r", b"4" * 9, b"5" * 25]), max_size=10),
       st.booleans(), st.lists(st.integers(0, 200), max_size=4), st.integers(1, 12),
       st.integers(1, 12))
def test_ranges_under_a_cap_give_each_long_line_its_size_and_offset(
        tmp_path_factory, lines, newline_at_end, cuts, chunk, cap):
    """Whatever the cuts, chunk and cap: every line comes out once, at its byte offset, whole
    when it is at most ``cap`` bytes and as a ``LongLine`` of its exact size when longer."""
    from palign.data.lines import LongLine, _file_lines, _range_lines

    data = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
    path = tmp_path_factory.mktemp("capped") / "x.jsonl"
    path.write_bytes(data)
    want, at = [], 0
    for line in data.split(b"\n"):
        want.append((at, line if len(line) <= cap else LongLine(len(line), cap)))
        at += len(line) + 1
    if want and want[-1][1] == b"":
        want.pop()
    assert list(_file_lines(path, chunk, cap)) == [line for _, line in want]
    bounds = sorted({0, *(c % (len(data) + 2) for c in cuts)})
    got = [pair for start, stop in zip(bounds, [*bounds[1:], None])
           for pair in _range_lines(path, start, stop, chunk, cap)]
    assert got == want


def test_a_number_past_pythons_digit_limit_is_an_unreadable_line_not_a_crash(tmp_path):
    """``json.loads`` raises a plain ValueError (not a JSONDecodeError) for an integer of more
    than 4300 digits: the line is unreadable, the rows after it are read."""
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "Q?", "answer": "1"}],
                extra_lines=['{"id": ' + "1" * 5000 + ', "question": "Q?", "answer": "1"}',
                             json.dumps({"id": "b", "question": "Q?", "answer": "1"})])
    problems, rejects = read_problems(DataSection(path=str(tmp_path / "p.jsonl")))
    assert [p["id"] for p in problems] == ["a", "b"]
    assert rejects[0].id == "p.jsonl:2" and "invalid JSON: Exceeds the limit" in \
        rejects[0].reason
