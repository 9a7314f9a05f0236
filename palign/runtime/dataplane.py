"""What a stage has to do, planned from indexes alone, and the Ray Data reads that fetch it.

The driver never holds rows. It reads the input's index (ids and shard names, a few columns)
and the output's indexes (the ids done), and makes one read item per input shard that still
has rows to do, each with the ids to skip in it (usually none: only shards a killed run was
halfway through have any). Ray Data tasks then read those shards where the data lives and hand
``{"id", "record"}`` rows (the record as JSON text) to the stage's actor pool; the workers write
the results themselves (``palign.runtime.commit``), and only counts come back to the driver.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from palign.data import storage
from palign.data.digest import read_index
from palign.data.layout import FILE
from palign.data.lines import iter_lines
from palign.data.shards import read_shard, shard_index

READ_COLUMNS = ("id", "record")


@dataclass
class Plan:
    """A stage's work: the read items, and what the indexes said about the input."""

    items: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int = 0
    skipped: int = 0  # done by an earlier run
    pending: int = 0
    columns: dict[str, list[Any]] = field(default_factory=dict)  # input columns of rows to do

    def add(self, other: Plan) -> None:
        self.items += other.items
        self.rows_in += other.rows_in
        self.skipped += other.skipped
        self.pending += other.pending
        for key, values in other.columns.items():
            self.columns.setdefault(key, []).extend(values)


def plan(input_folder: str, done: pa.Array, extra: Mapping[str, Any] | None = None,
         columns: Sequence[str] = ()) -> Plan:
    """The read items for the rows of ``input_folder`` whose ids are not in ``done``;
    ``extra`` fields are added to every record read (evaluate: the model and benchmark), and
    ``columns`` of the input's index are returned for the rows to do."""
    # Arrow columns throughout: the driver's memory per row is its id's bytes, not Python
    # objects (benchmarks/data_plane.py measures it).
    index = read_index(input_folder, ("id", *columns))
    is_done = pc.is_in(index["id"], value_set=done)
    todo = index.filter(pc.invert(is_done))
    shards = pc.unique(todo[FILE]).to_pylist() if todo.num_rows else []
    # The ids to skip, only in the shards that still have rows to do (a killed run's last
    # shards); a shard done in full is not read at all.
    finished = index.filter(is_done)
    partial = finished.filter(pc.is_in(finished[FILE], value_set=pa.array(shards, pa.string())))
    skip: dict[str, list[str]] = {}
    for shard, row_id in zip(partial[FILE].to_pylist(), partial["id"].to_pylist()):
        skip.setdefault(shard, []).append(row_id)
    items = [{"path": storage.join(input_folder, shard), "skip": skip.get(shard, []),
              "extra": dict(extra or {})} for shard in sorted(shards)]
    return Plan(items=items, rows_in=index.num_rows, skipped=finished.num_rows,
                pending=todo.num_rows, columns={c: todo[c].to_pylist() for c in columns})


def read_records(path: str, skip: Sequence[str] = (),
                 extra: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(ids, records as JSON text) of one committed shard, without the ``skip`` ids, each record
    with ``extra`` added. A JSONL shard's lines are handed on unparsed when nothing is added."""
    ids = [str(i) for i in shard_index(path, ["id"])["id"].to_pylist()]
    if not ids:
        return [], []
    skipped = set(skip)
    if path.endswith(".jsonl") and not extra:
        lines = [ln for ln in iter_lines(path) if ln.strip()]
        if len(lines) == len(ids):  # as committed (else: a shard being rewritten, below)
            pairs = [(i, ln.decode("utf-8")) for i, ln in zip(ids, lines) if i not in skipped]
            return [p[0] for p in pairs], [p[1] for p in pairs]
    listed = set(ids)
    out_ids, records = [], []
    for row in read_shard(path):
        row_id = str(row["id"])
        if row_id in skipped or row_id not in listed:
            continue
        out_ids.append(row_id)
        records.append(json.dumps({**row, **(extra or {})}, ensure_ascii=False, default=str))
    return out_ids, records


def dataset(items: list[dict[str, Any]]) -> Any:
    """A lazy Ray Data dataset of the rows the items point at, read in parallel tasks (one
    item per block, so one shard per task)."""
    import ray

    rows = [{"path": it["path"], "skip": json.dumps(it["skip"]),
             "extra": json.dumps(it["extra"])} for it in items]
    # No CPU reserved: a read is a small share of an engine batch's work, and on a machine whose
    # CPUs the engine actors hold, a read that waited for a free CPU would never start.
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map_batches(
        _read_block, batch_size=None, batch_format="pyarrow", num_cpus=0)


def _read_block(batch: pa.Table) -> pa.Table:
    ids: list[str] = []
    records: list[str] = []
    for path, skip, extra in zip(batch["path"].to_pylist(), batch["skip"].to_pylist(),
                                 batch["extra"].to_pylist()):
        i, r = read_records(path, json.loads(skip), json.loads(extra) or None)
        ids += i
        records += r
    return pa.table({"id": pa.array(ids, pa.string()),
                     "record": pa.array(records, pa.large_string())})
