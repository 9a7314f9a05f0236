"""The ingest stage: the source's files to committed problem shards, in parallel, then one pass
over the ids alone.

Each source file, or each piece of a file over ``data.piece_mib`` (``source_pieces``), is read
and validated by one Ray Data task (``ingest_file``), which writes its problems and rejects in
shards named after the piece and the chunk (a retried task writes the same names). A piece is
streamed: memory does not grow with its size. What no single task can
see is settled afterwards on the driver from the shards' indexes, never from whole rows
(``finish_ingest``): ``data.limit`` keeps the source's first rows in file order, and an id seen
again after its first appearance becomes a reject. ``_DONE`` marks a finished ingest; an
unfinished one is redone from the start.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from palign.config import DataSection
from palign.data import storage
from palign.data.digest import read_index
from palign.data.ingest import Rejected, SourceFile, read_file, source_pieces, validate_row
from palign.data.layout import DONE_MARKER, FILE, REJECTS
from palign.data.shards import read_committed, reject_columns, reject_row, shard_index, write_shard

log = logging.getLogger(__name__)

POSITION = ("file", "seq", "pos")  # where a row was in the source: file number, row number, text


def ingest_file(source: SourceFile, data: DataSection, folder: str,
                shard_rows: int) -> dict[str, int]:
    """Validate one source file into problem and reject shards of ``folder``; returns the
    counts. With ``data.limit`` at most that many rows of the file are read."""
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    good_at: list[tuple[int, str]] = []
    bad_at: list[tuple[int, str]] = []
    counts = {"rows": 0, "rejects": 0}
    chunk = 0

    def flush() -> None:
        nonlocal chunk
        stem = f"part-f{source.number:06d}-{chunk:06d}"
        if bad:
            write_shard(storage.join(folder, REJECTS), stem, bad, "jsonl",
                        {**reject_columns(bad), **_position(source, bad_at)})
        if good:
            write_shard(folder, stem, good, "jsonl",
                        {"has_cot": [r["cot"] is not None for r in good],
                         **_position(source, good_at)})
        counts["rows"] += len(good)
        counts["rejects"] += len(bad)
        chunk += 1
        for buf in (good, bad, good_at, bad_at):
            buf.clear()

    for seq, (pos, raw) in enumerate(read_file(source, data.max_line_mib << 20)):
        if data.limit is not None and seq >= data.limit:
            break
        result = validate_row(pos, raw, data)
        if isinstance(result, Rejected):
            bad.append(reject_row(result.id, "ingest", result.reason, result.row))
            bad_at.append((seq, pos))
        else:
            good.append(result)
            good_at.append((seq, pos))
        if len(good) >= shard_rows or len(bad) >= shard_rows:
            flush()
    flush()
    return counts


def _position(source: SourceFile, at: list[tuple[int, str]]) -> dict[str, list[Any]]:
    return {"file": [source.number] * len(at), "seq": [s for s, _ in at],
            "pos": [p for _, p in at]}


def _order(table: pa.Table) -> pa.Array:
    """One sortable number per row: its file number, then its row number in the file."""
    return pc.add(pc.multiply(table["file"].cast(pa.int64()), pa.scalar(1 << 32, pa.int64())),
                  table["seq"].cast(pa.int64()))


def finish_ingest(folder: str, data: DataSection) -> dict[str, int]:
    """Apply ``data.limit`` across files and reject repeated ids (all but the first, in file
    order), from the indexes; rewrite only the shards that change; mark the ingest done."""
    out = read_index(folder, ("id", *POSITION))
    rej = read_index(storage.join(folder, REJECTS), ("id", *POSITION))
    drop: dict[tuple[str, str], set[int]] = {}  # (folder, shard) -> order numbers to remove
    if data.limit is not None and out.num_rows + rej.num_rows > data.limit:
        orders = pa.chunked_array([*_order(out).chunks, *_order(rej).chunks],
                                  pa.int64()).combine_chunks()
        cut = orders.take(pc.sort_indices(orders))[data.limit - 1].as_py()
        for where, table in ((folder, out), (storage.join(folder, REJECTS), rej)):
            late = table.filter(pc.greater(_order(table), cut))
            for shard, order in zip(late[FILE].to_pylist(), _order(late).to_pylist()):
                drop.setdefault((where, shard), set()).add(order)
        out = out.filter(pc.less_equal(_order(out), cut))
    repeats = _repeated(out)
    dup_rejects: list[dict[str, Any]] = []
    dup_at: list[tuple[int, int, str]] = []
    dup_orders: set[int] = set()
    if repeats.num_rows:
        for shard, order in zip(repeats[FILE].to_pylist(), _order(repeats).to_pylist()):
            drop.setdefault((folder, shard), set()).add(order)
            dup_orders.add(order)
    first_seen = _first_seen(out, repeats)
    for (where, shard), orders in sorted(drop.items()):
        kept, gone = _split_shard(where, shard, orders)
        for row, (f, s, p) in gone:
            if where == folder and (f << 32) + s in dup_orders:
                dup_rejects.append(reject_row(row["id"], "ingest", f"duplicate id (first seen "
                                              f"at {first_seen[row['id']]})", row))
                dup_at.append((f, s, p))
        stem = shard.rsplit(".", 1)[0]
        columns = {"has_cot": [r.get("cot") is not None for r, _ in kept]} if where == folder \
            else reject_columns([r for r, _ in kept])
        columns |= {"file": [a[0] for _, a in kept], "seq": [a[1] for _, a in kept],
                    "pos": [a[2] for _, a in kept]}
        write_shard(where, stem, [r for r, _ in kept], "jsonl", columns)
    if dup_rejects:
        write_shard(storage.join(folder, REJECTS), "part-duplicates", dup_rejects, "jsonl",
                    {**reject_columns(dup_rejects), "file": [a[0] for a in dup_at],
                     "seq": [a[1] for a in dup_at], "pos": [a[2] for a in dup_at]})
    counts = {"rows": read_index(folder).num_rows,
              "rejects": read_index(storage.join(folder, REJECTS)).num_rows}
    storage.write_text(storage.join(folder, DONE_MARKER), json.dumps(counts))
    log.info("ingest: %d problems, %d rejects from %s", counts["rows"], counts["rejects"],
             data.path)
    return counts


def _repeated(out: pa.Table) -> pa.Table:
    """The rows whose id an earlier row (in file order) already has."""
    counts = pc.value_counts(out["id"])
    many = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(many) == 0:
        return out.slice(0, 0)
    rows = out.filter(pc.is_in(out["id"], value_set=many))
    rows = rows.append_column("_order", _order(rows)).sort_by([("id", "ascending"),
                                                               ("_order", "ascending")])
    ids = rows["id"].to_pylist()
    later = [i > 0 and ids[i] == ids[i - 1] for i in range(len(ids))]
    return rows.filter(pa.array(later)).drop_columns(["_order"])


def _first_seen(out: pa.Table, repeats: pa.Table) -> dict[str, str]:
    """For each repeated id, the position of its first row."""
    if not repeats.num_rows:
        return {}
    rows = out.filter(pc.is_in(out["id"], value_set=repeats["id"]))
    first: dict[str, tuple[int, str]] = {}
    for row_id, order, pos in zip(rows["id"].to_pylist(), _order(rows).to_pylist(),
                                  rows["pos"].to_pylist()):
        if row_id not in first or order < first[row_id][0]:
            first[row_id] = (order, pos)
    return {k: v[1] for k, v in first.items()}


def _split_shard(where: str, shard: str, orders: set[int]
                 ) -> tuple[list[tuple[dict[str, Any], tuple[int, int, str]]],
                            list[tuple[dict[str, Any], tuple[int, int, str]]]]:
    """A shard's rows with their positions, split into those kept and those whose order
    number is in ``orders``."""
    path = storage.join(where, shard)
    rows = read_committed(path)
    index = shard_index(path)
    kept, gone = [], []
    for row, f, s, p in zip(rows, index["file"].to_pylist(), index["seq"].to_pylist(),
                            index["pos"].to_pylist()):
        (gone if (f << 32) + s in orders else kept).append((row, (f, s, p)))
    return kept, gone


def ingest_here(folder: str, data: DataSection, shard_rows: int) -> dict[str, int]:
    """The whole ingest in this process, file after file (tests, small sources); the runner
    spreads ``ingest_file`` over Ray Data tasks instead."""
    storage.delete_dir(folder)
    for source in source_pieces(data, data.piece_mib << 20):
        ingest_file(source, data, folder, shard_rows)
    return finish_ingest(folder, data)


def ingest_block(batch: pa.Table, data: dict[str, Any], folder: str,
                 shard_rows: int) -> pa.Table:
    """Ray Data ``map_batches`` function: source files in, their counts out."""
    section = DataSection.model_validate(data)
    rows, rejects = [], []
    for piece in batch.to_pylist():
        counts = ingest_file(SourceFile(**piece), section, folder, shard_rows)
        rows.append(counts["rows"])
        rejects.append(counts["rejects"])
    return pa.table({"rows": rows, "rejects": rejects})
