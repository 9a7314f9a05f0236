"""Shards on any storage (``palign.core.storage``): written whole, committed by an index, read
back by id, so a killed or retried stage leaves every id exactly once.

A stage folder holds data shards (``part-<stem>.jsonl`` or ``.parquet``) and, for each
committed one, its index ``_index/part-<stem>.jsonl.parquet``: the shard's ids in row order,
plus the few columns summaries and resumes need (a reject's kind and reason, a truncated row's
prefix ratio, ...). The index is written after its data shard, and only the index says a shard
exists: a data shard without one (left by a killed write) is never read, and is removed when
the folder is next written. Object stores have no rename; a whole-object write under a known
name, committed by a second whole-object write, is what they do offer.

Engine stages name each batch's shard after the stage's run token and a hash of the batch's
ids; a batch whose index is already there (Ray retried a task whose write had finished) is not
written again. ``rejects/`` is a folder of the same shape. The ids done are the ids of both
indexes, after ``release_rejects`` has taken the rejects a rerun retries (``run.retry_rejects``:
by default those of kind ``system``) out of ``rejects/`` (into ``rejects_retried/``).

``write_digest`` gathers a folder's indexes into a few digest parts, ``_index/_digest-*.parquet``
of about ``DIGEST_ROWS`` rows each, recording each index file's size and modification time;
readers take from them the indexes still listed as recorded and read the rest one by one, so a
stage start on object storage reads one object per 65k rows instead of one per shard, and the
digest is never more than a faster copy. Parts are only added (the indexes written since the
last one) or dropped (one that holds an index rewritten or removed since): the writer holds one
part's rows at a time, whatever the folder's size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from palign.core import storage
from palign.core.failures import ROW, SYSTEM

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}
REJECTS = "rejects"
RETRIED = "rejects_retried"
INDEX = "_index"
DONE_MARKER = "_DONE"
FILE = "_file"  # the column read_index adds: the data shard each id is in
DIGEST = "_digest"  # in _index/: ``_digest-000000.parquet``...: the indexes in a few files
DIGEST_KEY = b"palign.digest"  # a part's metadata: the index files it holds, size and time
DIGEST_ROWS = 65_536  # rows a digest part gathers (at least): what its writer holds at once
EPOCH = "_epoch.json"  # in _index/: the token of the run that writes the folder now (the fence)

Columns = dict[str, Sequence[Any]]


# -- writing ----------------------------------------------------------------------------------

def batch_stem(token: str, ids: Iterable[str]) -> str:
    """A batch's shard name: the run's token and a hash of its ids, so a retried batch writes
    the same names (and finds its own commit) while a later run never meets an earlier one's.
    Each id is hashed with its length before it (``5:a\nb``), so no two sets of ids hash the
    same text, whatever characters the ids hold."""
    text = "".join(f"{len(i)}:{i}" for i in sorted(ids))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"part-{token}-{digest}"


def token_of(name: str) -> str:
    """The run token in a shard's name (``part-<token>-<hash>.jsonl``); "" for other names."""
    return name.split("-", 2)[1].split(".")[0] if name.startswith("part-") else ""


def read_epoch(folder: str | Path) -> str | None:
    """The token of the run that now writes ``folder`` (None: no run has fenced it)."""
    try:
        return str(json.loads(storage.read_text(storage.join(folder, INDEX, EPOCH)))["token"])
    except FileNotFoundError:
        return None


def write_epoch(folder: str | Path, token: str) -> None:
    """Fence ``folder`` for the run of ``token``: from now on an index is visible only if the
    digest holds it (sealed before this) or it is this run's. Under the run's lock, after
    ``write_digest`` has sealed what is there."""
    storage.write_text(storage.join(folder, INDEX, EPOCH), json.dumps({"token": token}))


def new_token() -> str:
    """A token no earlier run of a stage has used (time-ordered)."""
    return f"{time.time_ns():020d}{uuid.uuid4().hex[:6]}"


def data_name(stem: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}")
    return stem + FORMATS[fmt]


def is_committed(folder: str | Path, stem: str, fmt: str) -> bool:
    return storage.exists(storage.join(folder, INDEX, data_name(stem, fmt) + ".parquet"))


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
    listing = _Listing.of(folder)
    visible = set(_visible(folder, listing))
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
            for n in _visible(folder, _Listing.of(folder))]


def _visible(folder: str | Path, listing: _Listing) -> list[str]:
    """The index files of ``folder`` that readers see, in name order: those its digest holds
    as they are now, and the others the fence admits (``_Listing.admits``)."""
    with _Digest.of(folder, listing) as digest:
        current = digest.current
    return sorted({*current, *listing.rest(current)})


def _index_path(data_path: str) -> str:
    folder, name = data_path.rsplit("/", 1) if storage.is_uri(data_path) \
        else (str(Path(data_path).parent), Path(data_path).name)
    return storage.join(folder, INDEX, name + ".parquet")


def read_index(folder: str | Path, columns: Sequence[str] = ("id",),
               threads: int = 16) -> pa.Table:
    """The index of every committed shard of ``folder``: the requested columns (those a shard
    lacks are null) and ``_file``, the data shard's name; a shard's rows in their order, the
    shards in no particular order. Reads no data shard; the indexes the folder's digest holds
    as they are now come from it."""
    def one(name: str, shard: pq.ParquetFile) -> pa.Table:
        table = shard.read(columns=[c for c in columns if c in shard.schema_arrow.names])
        return _with_file(_project(table, columns), name)

    def held(part: _Part) -> pa.Table:
        names = part.file.schema_arrow.names
        table = part.rows(part.file.read(columns=[c for c in columns if c in names] + [FILE]))
        return _project(table, (*columns, FILE))

    listing = _Listing.of(folder)
    with _Digest.of(folder, listing, threads) as digest:
        tables = [t for t in digest.each(held, threads) if t.num_rows]
    tables += _each_index(folder, one, listing.rest(digest.current), threads)
    if not tables:
        return pa.table({**{c: pa.array([], pa.string()) for c in columns},
                         FILE: pa.array([], pa.dictionary(pa.int32(), pa.string()))})
    return pa.concat_tables(tables, promote_options="permissive")


def count_rows(folder: str | Path) -> int:
    """Committed rows of ``folder``: the digest's footer (or its file column, when some of
    what it holds has changed since) and the other indexes' footers; no other column read."""
    def held(part: _Part) -> int:
        if part.complete:
            return part.file.metadata.num_rows
        return part.rows(part.file.read(columns=[FILE])).num_rows if part.current else 0

    listing = _Listing.of(folder)
    with _Digest.of(folder, listing) as digest:
        n = sum(digest.each(held))
    rest = listing.rest(digest.current)
    return n + sum(
        _each_index(folder, lambda _, index: index.metadata.num_rows, rest))


def write_digest(folder: str | Path, threads: int = 16, part_rows: int = DIGEST_ROWS) -> int:
    """Gather the committed indexes of ``folder`` into digest parts (``_index/_digest-*``):
    their rows (all columns, ``_file`` naming each row's shard) and, in each part's metadata,
    each index file's name, size and modification time as listed. Readers take from the parts
    the rows of the index files still listed with that size and time, and read the others
    themselves, so an index added, rewritten or removed since is never missed or read stale.

    Parts that hold only current indexes are kept; one that holds an index since rewritten or
    removed is dropped (first, so that no two parts ever hold one index) and what it held still
    current is gathered again, with the indexes added since, into new parts of at least
    ``part_rows`` rows. Only while no one writes the folder (a stage's start and end, under the
    run's lock). Returns the number of index files the parts hold."""
    listing = _Listing.of(folder)
    with _Digest.of(folder, listing, threads) as digest:
        pass  # the footers say what each part holds
    stale = [p.name for p in digest.parts if not p.complete]
    for name in stale:
        storage.delete(storage.join(folder, INDEX, name))
    held = {n for p in digest.parts if p.complete for n in p.current}
    still = {n for p in digest.parts if not p.complete for n in p.current}
    rest = listing.rest(held, also=still)
    number = max((int(n.split("-")[1].split(".")[0]) for n in listing.parts
                  if n.count("-") == 1 and n.split("-")[1].split(".")[0].isdigit()), default=-1)
    tables: list[pa.Table] = []
    names: list[str] = []
    batch = max(1, threads) * 4
    for start in range(0, len(rest), batch):
        chunk = rest[start:start + batch]
        tables += _each_index(folder, lambda name, index: _with_file(index.read(), name), chunk,
                              threads)
        names += chunk
        if sum(t.num_rows for t in tables) >= part_rows or start + batch >= len(rest):
            number += 1
            _write_part(folder, f"{DIGEST}-{number:06d}.parquet", tables,
                        {n: listing.files[n] for n in names})
            tables, names = [], []
    return len(held) + len(rest)


def _write_part(folder: str | Path, name: str, tables: list[pa.Table],
                stamps: dict[str, list[int]]) -> None:
    """One digest part: ``tables`` (index files' rows) with their files' stamps."""
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.replace_schema_metadata({DIGEST_KEY: json.dumps({"files": stamps})})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(folder, INDEX, name), sink.getvalue())


def delete_digest(folder: str | Path) -> None:
    """Remove the digest parts of ``folder`` (before its indexes are rewritten)."""
    for name in _Listing.of(folder).parts:
        storage.delete(storage.join(folder, INDEX, name))


def write_digests(stage_dir: str | Path) -> None:
    """``write_digest`` for a stage folder and its rejects."""
    write_digest(stage_dir)
    write_digest(storage.join(stage_dir, REJECTS))


class _Listing:
    """A folder's committed index files as listed now (name -> [size, mtime ns]), its digest
    parts' names, and its epoch (the token of the run that writes it now, if one fenced it)."""

    def __init__(self, files: dict[str, list[int]], parts: list[str],
                 epoch: str | None = None) -> None:
        self.files, self.parts, self.epoch = files, parts, epoch

    @classmethod
    def of(cls, folder: str | Path) -> _Listing:
        found = storage.stat_files(storage.join(folder, INDEX), suffixes=(".parquet",))
        files = {n: [size, mtime] for n, size, mtime in found if n.startswith("part-")}
        return cls(files, [n for n, _, _ in found if n.startswith(DIGEST)], read_epoch(folder))

    def admits(self, name: str) -> bool:
        """Whether an index the digest does not hold is visible: in an unfenced folder all
        are; in a fenced one only the current run's (a superseded run's late commit is not)."""
        return self.epoch is None or token_of(name) == self.epoch

    def rest(self, held: Iterable[str], also: Iterable[str] = ()) -> list[str]:
        """The listed index files not in ``held`` that the fence admits (or that are in
        ``also``: held by a digest part being dropped), in name order."""
        skip, extra = set(held), set(also)
        return [n for n in sorted(self.files)
                if n not in skip and (n in extra or self.admits(n))]


class _Part:
    """One digest part, open: the index files it took that are listed now with the size and
    time they had then (``current``, none that an earlier part already gives); ``complete``:
    all it took."""

    def __init__(self, name: str, file: pq.ParquetFile, listing: _Listing,
                 claimed: set[str]) -> None:
        self.name, self.file = name, file
        meta = file.schema_arrow.metadata or {}
        stamps = json.loads(meta[DIGEST_KEY])["files"] if DIGEST_KEY in meta else {}
        self.current = [n for n, stamp in stamps.items()
                        if listing.files.get(n) == stamp and n not in claimed]
        self.complete = len(self.current) == len(stamps)

    def rows(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` (read from this part) of its current index files."""
        if self.complete:
            return table
        names = pa.array([n.removesuffix(".parquet") for n in self.current], pa.string())
        return table.filter(pc.is_in(table[FILE], value_set=names))


class _Digest:
    """A folder's digest parts, open (``with``), as they stand against a listing: their
    footers are read when it is made, their rows by ``each``."""

    def __init__(self, folder: str | Path, parts: list[_Part], files: list[Any]) -> None:
        self.folder, self.parts, self._files = folder, parts, files
        self.current = [n for p in parts for n in p.current]

    @classmethod
    def of(cls, folder: str | Path, listing: _Listing, threads: int = 16) -> _Digest:
        fs, root = storage.resolve(storage.join(folder, INDEX))
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(listing.parts) or 1))) as ex:
            opened = list(ex.map(lambda n: fs.open_input_file(f"{root}/{n}"), listing.parts))
        parts: list[_Part] = []
        claimed: set[str] = set()
        for name, f in zip(listing.parts, opened):
            part = _Part(name, pq.ParquetFile(f), listing, claimed)
            claimed.update(part.current)
            parts.append(part)
        return cls(folder, parts, opened)

    def __enter__(self) -> _Digest:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()

    def each(self, fn: Callable[[_Part], T], threads: int = 16) -> list[T]:
        """``fn(part)`` for every part, ``threads`` at a time."""
        if not self.parts:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.parts)))) as ex:
            return list(ex.map(fn, self.parts))


def _project(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` with exactly ``columns``, in that order (a column it lacks is null)."""
    return pa.table({c: (table[c] if c in table.column_names else pa.nulls(table.num_rows))
                     for c in columns})


def _with_file(table: pa.Table, name: str) -> pa.Table:
    """``table`` with ``_file``: the data shard of index file ``name``, one string per table
    (the column is dictionary-encoded)."""
    return table.append_column(FILE, pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(table.num_rows, np.int32)),
        pa.array([name.removesuffix(".parquet")], pa.string())))


def _each_index(folder: str | Path, fn: Callable[[str, pq.ParquetFile], T],
                names: Sequence[str], threads: int = 16) -> list[T]:
    """``fn(name, index file)`` for the index files ``names`` of ``folder``, in that order,
    ``threads`` at a time."""
    fs, root = storage.resolve(storage.join(folder, INDEX))

    def one(name: str) -> T:
        with fs.open_input_file(f"{root}/{name}") as f:
            return fn(name, pq.ParquetFile(f))

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        return list(pool.map(one, names))


def read_shard(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one data shard, as written (ValueError: a line that is not JSON)."""
    path = str(path)
    if path.endswith(".parquet"):
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            return pq.read_table(f).to_pylist()
    rows = []
    for lineno, row in storage.iter_jsonl(path):
        if isinstance(row, storage.Unreadable):
            raise ValueError(f"{path}:{lineno}: {row.reason}")
        rows.append(row)
    return rows


def shard_index(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The index of the data shard at ``path`` (FileNotFoundError: not committed)."""
    fs, p = storage.resolve(_index_path(str(path)))
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
            storage.delete(_index_path(path))
            write_shard(folder, batch_stem(token, [str(r["id"]) for r in keep]), keep, "jsonl",
                        reject_columns(keep))
            storage.delete(path)
        elif keep:
            write_shard(folder, stem, keep, "jsonl", reject_columns(keep))
        else:
            storage.delete(_index_path(path))
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
    or ``system``, see ``palign.core.failures``), and the row as it came."""
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
