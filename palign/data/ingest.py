"""Reading problems: JSONL, Parquet or a `datasets` folder (local or on object storage), row by
row, never crashing on a row.

Each source row becomes a problem record ``{id, question, answer, cot}`` (plus ``attempt`` when
``data.fields.attempt`` names the teacher's answer column) (``cot`` is None when
the data has none), or a reject with the id (or the row's position) and the reason. Reading row
by row, rather than through a columnar reader, is what lets one malformed row be rejected alone
instead of failing the whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from palign.config import DataSection
from palign.data import lines, storage

log = logging.getLogger(__name__)

# An id is one line of printable text of at most this many characters: ids name rows in
# shards, indexes, rejects and logs, where a line break or a control character would split
# or disguise them. A source id that breaks the rule is rejected, never rewritten.
MAX_ID_CHARS = 512
# Unicode's control characters (category Cc: \0, \t, \n, \r, ESC, DEL, NEL ...) and its line
# and paragraph separators
_ID_BREAK = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass
class Rejected:
    id: str
    reason: str
    row: Any


def question_id(question: str) -> str:
    """A stable id for rows that bring none: a hash of the question text."""
    return "q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class SourceFile:
    """One file of the source, or one piece of a large file: its number (files and pieces are
    read in this order), where it is (a local path or a URI) and how to read it. A piece of a
    JSONL file is the lines that start in the bytes ``[start, stop)``; a piece of a Parquet file
    is the row groups ``[start, stop)``, whose first row is the file's row ``first_row``.
    ``stop`` None: to the end of the file."""

    number: int
    path: str
    kind: Literal["jsonl", "json", "parquet", "arrow"]
    start: int = 0
    stop: int | None = None
    first_row: int = 0

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


def _detect_format(path: str) -> str:
    if storage.is_dir(path):
        names = storage.list_files(path)
        if "dataset_info.json" in names or "dataset_dict.json" in names:
            return "hf_disk"
        return "parquet" if any(n.endswith(".parquet") for n in names) else "jsonl"
    return "parquet" if path.endswith(".parquet") else "jsonl"


def source_files(data: DataSection) -> list[SourceFile]:
    """The files of the source, in reading order; a source that is not there is an error."""
    path = storage.absolute(data.path)
    if not storage.exists(path):
        raise FileNotFoundError(f"data.path: {data.path} does not exist")
    fmt = data.format if data.format != "auto" else _detect_format(path)
    if fmt == "hf_disk":
        return [SourceFile(i, p, "arrow") for i, p in enumerate(_arrow_files(path, data.split))]
    if fmt == "parquet":
        suffixes: tuple[str, ...] = (".parquet",)
    else:
        suffixes = (".jsonl", ".json")
    if storage.is_dir(path):
        files = [storage.join(path, n) for n in storage.list_files(path, suffixes=suffixes)]
    else:
        files = [path]
    return [SourceFile(i, f, "parquet" if fmt == "parquet" else
                       "json" if f.endswith(".json") else "jsonl")
            for i, f in enumerate(files)]


def source_pieces(data: DataSection, piece_bytes: int) -> list[SourceFile]:
    """``source_files`` with each file over ``piece_bytes`` cut into pieces of about that size,
    for as many tasks: an uncompressed JSONL file by byte ranges (a line belongs to the piece
    it starts in), a Parquet file by runs of whole row groups. Compressed JSONL, JSON arrays
    and the Arrow streams of a ``datasets`` folder (which `datasets` already writes in shards)
    are read whole. Pieces are numbered in reading order, so the order of their rows is the
    source's order."""
    files = source_files(data)
    root = storage.absolute(data.path)
    # A folder's sizes come from its one listing; a single file's from its own request.
    sizes = ({storage.join(root, n): size for n, size, _ in storage.stat_files(root)}
             if storage.is_dir(root) else {})
    cuts: dict[int, list[tuple[int, int | None, int]]] = {}
    big = [f for f in files if f.kind in ("jsonl", "parquet")
           and not (f.kind == "jsonl" and f.path.endswith(lines.COMPRESSED))]
    with ThreadPoolExecutor(16) as pool:  # a Parquet footer to read per large file
        for f, parts in zip(big, pool.map(lambda f: _cuts(f, piece_bytes, sizes.get(f.path)),
                                          big)):
            cuts[f.number] = parts
    pieces: list[SourceFile] = []
    for f in files:
        for start, stop, first_row in cuts.get(f.number, [(0, None, 0)]):
            pieces.append(SourceFile(len(pieces), f.path, f.kind, start, stop, first_row))
    return pieces


def _cuts(source: SourceFile, piece_bytes: int, size: int | None
          ) -> list[tuple[int, int | None, int]]:
    """(start, stop, first row) of each piece of one file (of ``size`` bytes, None: not known
    yet); one whole piece when it is small."""
    size = storage.file_size(source.path) if size is None else size
    if size <= piece_bytes:
        return [(0, None, 0)]
    if source.kind == "jsonl":
        starts = list(range(0, size, piece_bytes))
        return [(a, b, 0) for a, b in zip(starts, [*starts[1:], None])]
    fs, path = storage.resolve(source.path)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    parts: list[tuple[int, int | None, int]] = []
    start = first_row = rows = held = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        held += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        rows += group.num_rows
        if held >= piece_bytes and g + 1 < meta.num_row_groups:
            parts.append((start, g + 1, first_row))
            start, first_row, held = g + 1, rows, 0
    parts.append((start, None, first_row))
    return parts


def _arrow_files(path: str, split: str | None) -> list[str]:
    """The Arrow files of a ``datasets`` folder (``save_to_disk``), of one split if it has
    several."""
    names = storage.list_files(path)
    if "dataset_dict.json" in names:
        splits = json.loads(storage.read_text(storage.join(path, "dataset_dict.json")))["splits"]
        if split is None:
            raise ValueError(f"data.split: {path} holds splits {splits}; name one")
        if split not in splits:
            raise ValueError(f"data.split: {path} has no split {split!r} (it has {splits})")
        path = storage.join(path, split)
    state = json.loads(storage.read_text(storage.join(path, "state.json")))
    return [storage.join(path, f["filename"]) for f in state["_data_files"]]


def read_file(source: SourceFile, max_line: int = lines.MAX_LINE_BYTES
              ) -> Iterator[tuple[str, Any]]:
    """(position, raw row) for every row of one source file, streamed; raw rows may be
    anything (an unreadable line, or one over ``max_line`` bytes, comes as
    ``lines.Unreadable``)."""
    name = storage.name(source.path)
    if source.kind == "jsonl" and source.whole:
        for lineno, row in lines.iter_jsonl(source.path, max_line):
            yield f"{name}:{lineno}", row
    elif source.kind == "jsonl":  # a piece: its rows are named by their byte offset
        for offset, row in lines.iter_jsonl_range(source.path, source.start, source.stop,
                                                     max_line):
            yield f"{name}@{offset}", row
    elif source.kind == "json":
        yield from _json_file(name, storage.read_bytes(source.path))
    elif source.kind == "parquet":
        fs, path = storage.resolve(source.path)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            stop = parquet.num_row_groups if source.stop is None else source.stop
            start = source.first_row
            for batch in parquet.iter_batches(batch_size=1024,
                                              row_groups=range(source.start, stop)):
                for i, row in enumerate(batch.to_pylist()):
                    yield f"{name}[{start + i}]", row
                start += batch.num_rows
    else:
        fs, path = storage.resolve(source.path)
        with fs.open_input_stream(path) as f:
            start = 0
            for batch in pa.ipc.open_stream(f):
                for i, row in enumerate(batch.to_pylist()):
                    yield f"row[{start + i}]", row
                start += batch.num_rows


def iter_source(data: DataSection) -> Iterator[tuple[str, Any]]:
    """Yield (position, raw row) for every row of the source, file after file."""
    for source in source_files(data):
        yield from read_file(source, data.max_line_mib << 20)


def _json_file(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """A whole-file JSON array (or one object): its elements are the rows."""
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        yield name, lines.Unreadable(f"invalid JSON file: {err}")
        return
    for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
        yield f"{name}[{i}]", row


def validate_row(pos: str, raw: Any, data: DataSection) -> dict[str, Any] | Rejected:
    """A problem record from one source row, or the reason it cannot be used."""
    if isinstance(raw, lines.Unreadable):
        return Rejected(pos, raw.reason, raw.raw)
    if not isinstance(raw, dict):
        return Rejected(pos, f"row is a {type(raw).__name__}, not an object", raw)
    f = data.fields
    given_id = raw.get(f.id)
    question = raw.get(f.question)
    id_ok = isinstance(given_id, (str, int)) and not isinstance(given_id, bool)
    row_id = str(given_id) if id_ok and str(given_id).strip() else None
    if given_id is not None and row_id is None:
        return Rejected(pos, f"field {f.id!r} must be a non-empty string or integer", raw)
    if row_id is not None and (problem := id_problem(row_id)):
        return Rejected(pos, f"field {f.id!r} {problem}", raw)
    if question is None:
        return Rejected(row_id or pos, f"missing question field {f.question!r}", raw)
    if not isinstance(question, str):
        return Rejected(row_id or pos, f"field {f.question!r} is not a string", raw)
    if not question.strip():
        return Rejected(row_id or pos, f"field {f.question!r} is empty", raw)
    if not _is_unicode(question):
        return Rejected(pos, f"field {f.question!r} holds a lone surrogate (not valid Unicode)",
                        raw)
    row_id = row_id or question_id(question)
    answer = raw.get(f.answer)
    # Numeric gold answers are common in math datasets; they are kept as their text.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):
            return Rejected(row_id, f"field {f.answer!r} is not a finite number", raw)
        answer = str(answer)
    if answer is None:
        return Rejected(row_id, f"missing answer field {f.answer!r}", raw)
    if not isinstance(answer, str):
        return Rejected(row_id, f"field {f.answer!r} is not a string or number", raw)
    if not answer.strip():
        return Rejected(row_id, f"field {f.answer!r} is empty", raw)
    cot = raw.get(f.cot) if f.cot else None
    if cot is not None and not isinstance(cot, str):
        return Rejected(row_id, f"field {f.cot!r} is not a string", raw)
    if cot is not None and not cot.strip():
        cot = None  # an empty CoT is a missing one: the teacher writes it
    if cot is not None and len(cot) > data.max_cot_chars:
        return Rejected(
            row_id, f"CoT has {len(cot)} characters, over data.max_cot_chars={data.max_cot_chars}",
            raw,
        )
    attempt = raw.get(f.attempt) if f.attempt else None
    if attempt is not None and not isinstance(attempt, str):
        return Rejected(row_id, f"field {f.attempt!r} is not a string", raw)
    for name, value in ((f.answer, answer), (f.cot, cot), (f.attempt, attempt)):
        if isinstance(value, str) and not _is_unicode(value):
            return Rejected(row_id, f"field {name!r} holds a lone surrogate (not valid Unicode)",
                            raw)
    record = {"id": row_id, "question": question, "answer": answer.strip(), "cot": cot}
    if f.attempt:  # only when the data names one: other records keep their four fields
        record["attempt"] = attempt.strip() if attempt and attempt.strip() else None
    return record


def id_problem(row_id: str) -> str | None:
    """What makes ``row_id`` unusable as an id (see ``MAX_ID_CHARS``), or None."""
    if len(row_id) > MAX_ID_CHARS:
        return f"has {len(row_id)} characters, over the {MAX_ID_CHARS} an id may have"
    if found := _ID_BREAK.search(row_id):
        return (f"holds U+{ord(found.group()):04X}, a control character or line break, at "
                f"character {found.start() + 1} (an id is one line of printable text)")
    if not _is_unicode(row_id):
        return "holds a lone surrogate (not valid Unicode)"
    return None


def _is_unicode(text: str) -> bool:
    """False for text with lone surrogates (JSON escapes like \\ud800 decode to them), which
    no UTF-8 file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_problems(data: DataSection) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """All usable problems and all rejects of the source; duplicate ids after the first are
    rejected."""
    problems: list[dict[str, Any]] = []
    rejects: list[Rejected] = []
    seen: dict[str, str] = {}
    for pos, raw in iter_source(data):
        if data.limit is not None and len(problems) + len(rejects) >= data.limit:
            break
        result = validate_row(pos, raw, data)
        if isinstance(result, Rejected):
            rejects.append(result)
        elif result["id"] in seen:
            first = seen[result["id"]]
            rejects.append(Rejected(result["id"], f"duplicate id (first seen at {first})", raw))
        else:
            seen[result["id"]] = pos
            problems.append(result)
    log.info("ingest: %d problems, %d rejects from %s", len(problems), len(rejects), data.path)
    return problems, rejects
