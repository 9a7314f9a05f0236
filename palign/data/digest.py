"""The digest: a folder's indexes gathered into a few files, so a stage start reads a handful
of objects instead of one per shard.

``write_digest`` gathers a folder's indexes into a few digest parts, ``_index/_digest-*.parquet``
of about ``DIGEST_ROWS`` rows each, recording each index file's size and modification time;
readers take from them the indexes still listed as recorded and read the rest one by one, so a
stage start on object storage reads one object per 65k rows instead of one per shard, and the
digest is never more than a faster copy. Parts are only added (the indexes written since the
last one) or dropped (one that holds an index rewritten or removed since): the writer holds one
part's rows at a time, whatever the folder's size.

The readers of the indexes live here too (``read_index``, ``count_rows``,
``visible_indexes``), since each is the digest's rows plus the index files it does not hold
that the fence admits (``palign.data.fence``). Data shards are read and written by
``palign.data.shards``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from palign.data import storage
from palign.data.fence import Listing
from palign.data.layout import DIGEST, FILE, INDEX, REJECTS

T = TypeVar("T")

DIGEST_KEY = b"palign.digest"  # a part's metadata: the index files it holds, size and time
DIGEST_ROWS = 65_536  # rows a digest part gathers (at least): what its writer holds at once


def visible_indexes(folder: str | Path, listing: Listing) -> list[str]:
    """The index files of ``folder`` that readers see, in name order: those its digest holds
    as they are now, and the others the fence admits (``Listing.admits``)."""
    with _Digest.of(folder, listing) as digest:
        current = digest.current
    return sorted({*current, *listing.rest(current)})


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

    listing = Listing.of(folder)
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

    listing = Listing.of(folder)
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
    listing = Listing.of(folder)
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
    for name in Listing.of(folder).parts:
        storage.delete(storage.join(folder, INDEX, name))


def write_digests(stage_dir: str | Path) -> None:
    """``write_digest`` for a stage folder and its rejects."""
    write_digest(stage_dir)
    write_digest(storage.join(stage_dir, REJECTS))


class _Part:
    """One digest part, open: the index files it took that are listed now with the size and
    time they had then (``current``, none that an earlier part already gives); ``complete``:
    all it took."""

    def __init__(self, name: str, file: pq.ParquetFile, listing: Listing,
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
    def of(cls, folder: str | Path, listing: Listing, threads: int = 16) -> _Digest:
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
