"""Reading problems: JSONL, Parquet or a `datasets` folder, row by row, never crashing on a row.

Each source row becomes a problem record ``{id, question, answer, cot}`` (``cot`` is None when
the data has none), or a reject with the id (or the row's position) and the reason. Reading row
by row, rather than through a columnar reader, is what lets one malformed row be rejected alone
instead of failing the whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.config import DataSection

log = logging.getLogger(__name__)


@dataclass
class Rejected:
    id: str
    reason: str
    row: Any


def question_id(question: str) -> str:
    """A stable id for rows that bring none: a hash of the question text."""
    return "q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        suffixes = {p.suffix for p in path.iterdir() if p.is_file()}
        if ".parquet" in suffixes:
            return "parquet"
        return "jsonl"
    return "parquet" if path.suffix == ".parquet" else "jsonl"


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in suffixes)
    return [path]


def iter_source(data: DataSection) -> Iterator[tuple[str, Any]]:
    """Yield (position, raw row) for every row of the source; raw rows may be anything."""
    path = Path(data.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    fmt = data.format if data.format != "auto" else _detect_format(path)
    if fmt == "jsonl":
        for file in _files(path, (".jsonl", ".json")):
            if file.suffix == ".json":
                yield from _json_file(file)
            else:
                yield from _jsonl_file(file)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for file in _files(path, (".parquet",)):
            start = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
                for i, row in enumerate(batch.to_pylist()):
                    yield f"{file.name}[{start + i}]", row
                start += batch.num_rows
    else:
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if data.split is None:
                raise ValueError(f"data.split: {path} holds splits {list(ds)}; name one")
            ds = ds[data.split]
        for i, row in enumerate(ds):
            yield f"row[{i}]", row


def _jsonl_file(file: Path) -> Iterator[tuple[str, Any]]:
    """One row per line: lines end at \\n only (a \\r inside a line is the line's own
    business), a CRLF ending and a byte-order mark before the first line are dropped. A line
    that is not UTF-8, or not JSON, is an unreadable row, not the end of the file."""
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            raw = raw.rstrip(b"\n").removesuffix(b"\r")
            if not raw.strip():
                continue
            pos = f"{file.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield pos, _Unreadable(f"not valid UTF-8: {err.reason} at byte {err.start}",
                                       raw[:2000].decode("utf-8", "replace"))
                continue
            try:
                yield pos, json.loads(line)
            except json.JSONDecodeError as err:
                yield pos, _Unreadable(f"invalid JSON: {err.msg} (column {err.colno})",
                                       line[:2000])
            except RecursionError:
                yield pos, _Unreadable("invalid JSON: nested too deeply", line[:2000])


def _json_file(file: Path) -> Iterator[tuple[str, Any]]:
    """A whole-file JSON array (or one object): its elements are the rows."""
    try:
        rows = json.loads(file.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        yield f"{file.name}", _Unreadable(f"invalid JSON file: {err}")
        return
    for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
        yield f"{file.name}[{i}]", row


class _Unreadable:
    def __init__(self, reason: str, raw: str | None = None) -> None:
        self.reason = reason
        self.raw = raw


def validate_row(pos: str, raw: Any, data: DataSection) -> dict[str, Any] | Rejected:
    """A problem record from one source row, or the reason it cannot be used."""
    if isinstance(raw, _Unreadable):
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
    if question is None:
        return Rejected(row_id or pos, f"missing question field {f.question!r}", raw)
    if not isinstance(question, str):
        return Rejected(row_id or pos, f"field {f.question!r} is not a string", raw)
    if not question.strip():
        return Rejected(row_id or pos, f"field {f.question!r} is empty", raw)
    for name, value in ((f.id, row_id), (f.question, question)):
        if value is not None and not _is_unicode(value):
            return Rejected(pos, f"field {name!r} holds a lone surrogate (not valid Unicode)",
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
    for name, value in ((f.answer, answer), (f.cot, cot)):
        if isinstance(value, str) and not _is_unicode(value):
            return Rejected(row_id, f"field {name!r} holds a lone surrogate (not valid Unicode)",
                            raw)
    return {"id": row_id, "question": question, "answer": answer.strip(), "cot": cot}


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
