"""Shards on any storage (``palign.data.storage``): written whole, committed by an index, read
back by id, so a killed or retried stage leaves every id exactly once.

A stage folder (``palign.data.layout``) holds data shards and, for each committed one, its
index under ``_index/``: the shard's ids in row order, plus the few columns summaries and
resumes need (a reject's kind and reason, a truncated row's prefix ratio, ...). The index is
written after its data shard, and only the index says a shard exists: a data shard without one
(left by a killed write) is never read, and is removed when the folder is next written. Object
stores have no rename; a whole-object write under a known name, committed by a second
whole-object write, is what they do offer.

Engine stages name each batch's shard after the stage's run token and a hash of the batch's
ids; a batch whose index is already there (Ray retried a task whose write had finished) is not
written again. ``rejects/`` is a folder of the same shape. The ids done are the ids of both
indexes, after ``release_rejects`` has taken the rejects a rerun retries (``run.retry_rejects``:
by default those of kind ``system``) out of ``rejects/`` (into ``rejects_retried/``).

Which index files a reader sees is the fence's rule (``palign.data.fence``); the indexes are
read, and gathered into digests, by ``palign.data.digest``. The names those modules hold are
re-exported here, so ``from palign.data.shards import read_index`` keeps working.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from palign.common.failures import ROW, SYSTEM
from palign.data import storage
from palign.data.digest import (
    DIGEST_KEY,
    DIGEST_ROWS,
    count_rows,
    delete_digest,
    read_index,
    visible_indexes,
    write_digest,
    write_digests,
)
from palign.data.fence import Listing, read_epoch, write_epoch
from palign.data.layout import (
    DIGEST,
    DONE_MARKER,
    EPOCH,
    FILE,
    FORMATS,
    INDEX,
    REJECTS,
    RETRIED,
    batch_stem,
    data_name,
    index_path,
    is_committed,
    new_token,
    token_of,
)
from palign.data.lines import Unreadable, iter_jsonl

__all__ = [  # this module's names, and those of layout, fence and digest it re-exports
    "DIGEST", "DIGEST_KEY", "DIGEST_ROWS", "DONE_MARKER", "EPOCH", "FILE", "FORMATS", "INDEX",
    "REJECTS", "RETRIED", "Columns", "ShardWriter", "batch_stem", "clean_uncommitted",
    "count_rows", "data_name", "delete_digest", "done_index", "encode_rows", "is_committed",
    "new_token", "read_committed", "read_committed_ids", "read_epoch", "read_ids", "read_index",
    "read_rows", "read_shard", "reject_columns", "reject_reasons", "reject_row",
    "release_rejects", "replace_atomically", "retried", "shard_files", "shard_index",
    "token_of", "write_digest", "write_digests", "write_epoch", "write_shard",
]

log = logging.getLogger(__name__)

Columns = dict[str, Sequence[Any]]


# -- writing ----------------------------------------------------------------------------------

def encode_rows(rows: Sequence[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(list(rows)), sink)
        return sink.getvalue()
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                   for r in rows).encode("utf-8")


def write_shard(folder: str | Path, stem: str, rows: Sequence[dict[str, Any]], fmt: str = "jsonl",
                columns: Columns | None = None) -> str:
    """Write ``rows`` as shard ``stem`` of ``folder`` and commit it: the data first, then its
    index (the ids, plus ``columns``, one value per row). An earlier shard of that name is
    uncommitted before it is overwritten. Rows without ids are an error of the caller."""
    name = data_name(stem, fmt)
    index = storage.join(folder, INDEX, name + ".parquet")
    storage.delete(index)
    if rows:
        storage.write_bytes(storage.join(folder, name), encode_rows(rows, fmt))
    else:
        storage.delete(storage.join(folder, name))
    table = {"id": pa.array([str(r["id"]) for r in rows], pa.string())}
    for key, values in (columns or {}).items():
        if len(values) != len(rows):
            raise ValueError(f"index column {key!r} has {len(values)} values for {len(rows)} rows")
        table[key] = pa.array(list(values))
    sink = io.BytesIO()
    pq.write_table(pa.table(table), sink)
    storage.write_bytes(index, sink.getvalue())
    return storage.join(folder, name)


def reject_columns(rejects: Sequence[dict[str, Any]]) -> Columns:
    """The index columns of a rejects shard."""
    return {"kind": [str(r.get("kind", ROW)) for r in rejects],
            "reason": [str(r.get("reason")) for r in rejects]}


class ShardWriter:
    """Writes rows to ``folder`` in committed shards of at most ``shard_rows``, each under a
    fresh name (rows whose shard name must be known in advance use ``write_shard``). A folder
    named ``rejects`` gets the rejects' kind and reason in its index; ``index`` gives other
    index columns for a chunk of rows (a stage's ``Stage.index_values``)."""

    def __init__(self, folder: str | Path, fmt: str = "jsonl", shard_rows: int = 64,
                 index: Callable[[Sequence[dict[str, Any]]], Columns] | None = None) -> None:
        data_name("x", fmt)  # an unknown format fails here
        self.index = index
        self.folder = str(folder)
        self.fmt = fmt
        self.shard_rows = shard_rows
        storage.make_dir(self.folder)
        clean_uncommitted(self.folder)

    def write(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        rows = list(rows)
        paths = []
        for start in range(0, len(rows), self.shard_rows):
            chunk = rows[start:start + self.shard_rows]
            if self.index is not None:
                columns: Columns | None = self.index(chunk)
            elif storage.name(self.folder) in (REJECTS, RETRIED):
                columns = reject_columns(chunk)
            else:
                columns = None
            paths.append(write_shard(self.folder, f"part-{new_token()}", chunk, self.fmt,
                                     columns))
        return paths


def clean_uncommitted(folder: str | Path) -> int:
    """Remove data shards without an index and temporary files (what a killed write left).
    Only while no one writes the folder: at the start of a stage, under the run's lock."""
    listing = Listing.of(folder)
    visible = set(visible_indexes(folder, listing))
    committed = {n.removesuffix(".parquet") for n in visible}
    removed = 0
    for name in set(listing.files) - visible:  # a superseded run's commit, after the seal
        storage.delete(storage.join(folder, INDEX, name))
        removed += 1
    for name in storage.list_files(folder):
        orphan = name.startswith("part-") and name.endswith(tuple(FORMATS.values())) \
            and name not in committed
        if orphan or name.startswith(".tmp-"):
            storage.delete(storage.join(folder, name))
            removed += 1
    return removed


# -- reading ----------------------------------------------------------------------------------

def shard_files(folder: str | Path) -> list[str]:
    """The committed data shards of ``folder`` (their paths), in name order."""
    return [storage.join(folder, n.removesuffix(".parquet"))
            for n in visible_indexes(folder, Listing.of(folder))]


def read_shard(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one data shard, as written (ValueError: a line that is not JSON)."""
    path = str(path)
    if path.endswith(".parquet"):
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            return pq.read_table(f).to_pylist()
    rows = []
    for lineno, row in iter_jsonl(path):
        if isinstance(row, Unreadable):
            raise ValueError(f"{path}:{lineno}: {row.reason}")
        rows.append(row)
    return rows


def shard_index(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The index of the data shard at ``path`` (FileNotFoundError: not committed)."""
    fs, p = storage.resolve(index_path(str(path)))
    with fs.open_input_file(p) as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


def read_committed(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one committed shard that its index lists (a shard being rewritten may
    briefly hold more; a batch whose rows all went elsewhere has an index and no data)."""
    ids = shard_index(path, ["id"])["id"].to_pylist()
    if not ids:
        return []
    rows = read_shard(path)
    if len(ids) == len(rows):
        return rows
    keep = set(ids)
    return [r for r in rows if str(r.get("id")) in keep]


def read_committed_ids(folder: str | Path, name: str) -> list[str]:
    """The ids a committed shard's index lists ([] for a shard not committed)."""
    try:
        return [str(i) for i in shard_index(storage.join(folder, name), ["id"])["id"].to_pylist()]
    except FileNotFoundError:
        return []


def read_rows(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every row of the committed shards in ``folder``, shard by shard."""
    for path in shard_files(folder):
        yield from read_committed(path)


def read_ids(folder: str | Path) -> set[str]:
    return set(read_index(folder)["id"].to_pylist())


def reject_reasons(stage_dir: str | Path) -> list[str]:
    """The reason of every reject a stage folder holds (from the rejects' index)."""
    return [str(r) for r in read_index(storage.join(stage_dir, REJECTS),
                                       ("reason",))["reason"].to_pylist()]


def retried(reject: dict[str, Any], retry: str) -> bool:
    """Whether a rerun with ``run.retry_rejects: retry`` serves this reject's row again."""
    return retry == "all" or (retry == "system" and reject.get("kind", ROW) == SYSTEM)


def done_index(stage_dir: str | Path) -> pa.Array:
    """The ids a stage has finished, as one Arrow array (from the two indexes only)."""
    out = read_index(stage_dir)["id"]
    rej = read_index(storage.join(stage_dir, REJECTS))["id"]
    return pa.chunked_array([*out.chunks, *rej.chunks], pa.string()).combine_chunks()


def release_rejects(stage_dir: str | Path, retry: str, token: str | None = None) -> int:
    """Move the rejects a rerun retries out of ``rejects/`` (to ``rejects_retried/``), shard by
    shard; returns how many were released. Per shard: the record first (a kill after it leaves
    the reject done, never a row neither done nor pending), then the shard's index without
    them (the commit), then its data. With the run's ``token`` (a fenced folder), the rejects
    kept are written anew under it, after the old index is gone (a kill in between leaves them
    to do again, never twice)."""
    if retry == "none":
        return 0
    folder = storage.join(stage_dir, REJECTS)
    released = 0
    index = read_index(folder, ("kind",))
    if retry == "system":
        files = sorted({f for f, k in zip(index[FILE].to_pylist(), index["kind"].to_pylist())
                        if k == SYSTEM})
    else:
        files = sorted(set(index[FILE].to_pylist()))
    if files and token is None:
        # indexes rewritten in place get a new modification time, which readers check against
        # the digest; dropping the digest first does not rest on the store's time resolution.
        # (A fenced folder's digest is its seal and stays: there, an index is only ever
        # removed, and a removed one is gone from the digest's view.)
        delete_digest(folder)
    for name in files:
        path = storage.join(folder, name)
        rows = read_committed(path)
        again = [r for r in rows if retried(r, retry)]
        if not again:
            continue
        write_shard(storage.join(stage_dir, RETRIED), f"part-{new_token()}", again, "jsonl",
                    reject_columns(again))
        keep = [r for r in rows if not retried(r, retry)]
        stem = name.rsplit(".", 1)[0]
        if keep and token is not None:
            storage.delete(index_path(path))
            write_shard(folder, batch_stem(token, [str(r["id"]) for r in keep]), keep, "jsonl",
                        reject_columns(keep))
            storage.delete(path)
        elif keep:
            write_shard(folder, stem, keep, "jsonl", reject_columns(keep))
        else:
            storage.delete(index_path(path))
            storage.delete(path)
        released += len(again)
    if released:
        log.info("%s: %d earlier rejects will be tried again (run.retry_rejects=%s)",
                 storage.name(stage_dir), released, retry)
    return released


def replace_atomically(path: str | Path, data: bytes) -> None:
    """Write one whole file (local or object store): a reader never sees half of it."""
    storage.write_bytes(path, data)


# -- rejects ----------------------------------------------------------------------------------

def reject_row(row_id: str, stage: str, reason: str, row: Any = None,
               kind: str = ROW) -> dict[str, Any]:
    """The shape of every rejects file row: the id, the stage, why, whose fault it is (``row``
    or ``system``, see ``palign.common.failures``), and the row as it came."""
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
