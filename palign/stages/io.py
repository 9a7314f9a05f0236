"""Shards on disk: written atomically, read back by id, so a killed stage resumes exactly once.

A stage folder holds ``part-*.jsonl`` (or ``.parquet``) shards of finished rows and a
``rejects/`` folder of the same shape. A shard is written under a temporary name and renamed
into place, so a reader sees a whole shard or none. The ids done are the ids of both folders,
after ``release_rejects`` has taken the rejects a rerun retries (``run.retry_rejects``: by
default those of kind ``system``) out of ``rejects/`` (into ``rejects_retried/``, for the
record).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from palign.failures import ROW, SYSTEM

log = logging.getLogger(__name__)

FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}
REJECTS = "rejects"
RETRIED = "rejects_retried"
DONE_MARKER = "_DONE"


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.name.startswith("part-") and p.suffix in (".jsonl", ".parquet")
    )


def read_shard(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rows(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every row of the finished shards in ``folder``, shard by shard."""
    for path in shard_files(folder):
        yield from read_shard(path)


def read_ids(folder: str | Path) -> set[str]:
    return {str(row["id"]) for row in read_rows(folder)}


def reject_reasons(stage_dir: str | Path) -> list[str]:
    """The reason of every reject a stage folder holds."""
    return [str(r.get("reason")) for r in read_rows(Path(stage_dir) / REJECTS)]


def retried(reject: dict[str, Any], retry: str) -> bool:
    """Whether a rerun with ``run.retry_rejects: retry`` serves this reject's row again."""
    return retry == "all" or (retry == "system" and reject.get("kind", ROW) == SYSTEM)


def done_ids(stage_dir: str | Path) -> set[str]:
    """Ids a stage has finished: written as output or as rejects (call ``release_rejects``
    first to retry some of them)."""
    stage_dir = Path(stage_dir)
    return read_ids(stage_dir) | read_ids(stage_dir / REJECTS)


def release_rejects(stage_dir: str | Path, retry: str) -> int:
    """Move the rejects a rerun retries out of ``rejects/`` (to ``rejects_retried/``), shard by
    shard, each shard rewritten atomically; returns how many were released."""
    if retry == "none":
        return 0
    stage_dir = Path(stage_dir)
    released = 0
    for path in shard_files(stage_dir / REJECTS):
        rows = read_shard(path)
        again = [r for r in rows if retried(r, retry)]
        if not again:
            continue
        # The record first: a kill between the two steps leaves the reject in place (done),
        # never a row that is neither done nor pending.
        ShardWriter(stage_dir / RETRIED, "jsonl", max(1, len(again))).write(again)
        keep = [r for r in rows if not retried(r, retry)]
        if keep:
            replace_atomically(path, lambda tmp, keep=keep: _write_jsonl(tmp, keep))
        else:
            path.unlink()
        released += len(again)
    if released:
        log.info("%s: %d earlier rejects will be tried again (run.retry_rejects=%s)",
                 stage_dir.name, released, retry)
    return released


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Write one file through a temporary name beside it (``write(tmp)``), then rename it into
    place, so a reader never sees half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


class ShardWriter:
    """Writes rows to ``folder`` in shards of at most ``shard_rows``, each one atomically."""

    def __init__(self, folder: str | Path, fmt: str = "jsonl", shard_rows: int = 64) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown shard format {fmt!r}")
        self.folder = Path(folder)
        self.fmt = fmt
        self.shard_rows = shard_rows
        self.rows_written = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".tmp-*"):  # left by a killed run; never counted as done
            stale.unlink(missing_ok=True)

    def write(self, rows: Iterable[dict[str, Any]]) -> list[Path]:
        rows = list(rows)
        paths = []
        for start in range(0, len(rows), self.shard_rows):
            paths.append(self._write_one(rows[start:start + self.shard_rows]))
        return paths

    def _write_one(self, rows: list[dict[str, Any]]) -> Path:
        ext = FORMATS[self.fmt]
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{ext}"
        tmp = self.folder / f".tmp-{name}"
        if self.fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            _write_jsonl(tmp, rows)
        os.replace(tmp, self.folder / name)
        self.rows_written += len(rows)
        log.debug("wrote %s (%d rows)", self.folder / name, len(rows))
        return self.folder / name


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reject_row(row_id: str, stage: str, reason: str, row: Any = None,
               kind: str = ROW) -> dict[str, Any]:
    """The shape of every rejects file row: the id, the stage, why, whose fault it is (``row``
    or ``system``, see ``palign.failures``), and the row as it came."""
    return {"id": _clean_text(str(row_id)), "stage": stage, "reason": _clean_text(reason),
            "kind": kind, "row": _writable(row)}


def _clean_text(text: str) -> str:
    """Lone surrogates (which no UTF-8 file can hold) as their ``\\udxxx`` escape text."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _writable(value: Any) -> Any:
    """``value`` as a rejects file can hold it: as it came where it can be written, with lone
    surrogates escaped, else (nested too deeply, not JSON at all) its text, shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return {"unwritable": _clean_text(repr(value)[:2000])}
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return _clean(value)
        except RecursionError:
            return {"unwritable": _clean_text(repr(value)[:2000])}
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
