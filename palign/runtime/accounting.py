"""Every row accounted for: at a stage's end, each id of its input is in its output or its
rejects, exactly once, and every index that lists rows has its data object.

A stage that read n rows and wrote fewer, with no reject for the rest, would otherwise end with
exit 0 on missing rows; one that wrote an id twice would hand the next stage (or the trainer) a
duplicate. The check reads only indexes (ids and shard names), as the planner does, so its cost
is the ids' bytes whatever the rows' size.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from palign.common.failures import StageFailed
from palign.data import storage
from palign.data.digest import read_index
from palign.data.layout import FILE, REJECTS

SHOWN = 5  # ids named in a failure's message


def account(stage: str, source: str, out_dir: str, restart: str | None = None) -> None:
    """Fail (``StageFailed``) unless the ids of ``source`` are the ids of ``out_dir`` and its
    rejects together, each once, and each listed shard's data is there; the message names the
    first few ids at fault and where they were expected."""
    wanted = read_index(source)["id"]
    out = read_index(out_dir)
    rejects = read_index(storage.join(out_dir, REJECTS))
    done = pa.chunked_array([*out["id"].chunks, *rejects["id"].chunks], pa.string())
    problems = []
    counts = pc.value_counts(done) if len(done) else pa.array([], pa.struct(
        [("values", pa.string()), ("counts", pa.int64())]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(repeated):
        where = _where(out, rejects, repeated[:SHOWN])
        problems.append(f"{len(repeated)} id(s) written more than once ({where})")
    missing = pc.filter(wanted, pc.invert(pc.is_in(wanted, value_set=done)))
    if len(missing):
        problems.append(f"{len(missing)} of {len(wanted)} input id(s) are in neither "
                        f"{out_dir} nor its {REJECTS}/ ({_ids(missing)})")
    unknown = pc.filter(done, pc.invert(pc.is_in(done, value_set=wanted)))
    if len(unknown):
        problems.append(f"{len(unknown)} id(s) written that its input {source} does not hold "
                        f"({_ids(unknown)})")
    for folder, index in ((out_dir, out), (storage.join(out_dir, REJECTS), rejects)):
        lost = _missing_data(folder, index)
        if lost:
            problems.append(f"{len(lost)} committed shard(s) of {folder} have an index and no "
                            f"data (first: {', '.join(lost[:SHOWN])})")
    if problems:
        raise StageFailed(f"{stage}: rows are not accounted for: " + "; ".join(problems)
                          + ". The stage's output cannot be trusted: move it aside "
                          f"(`--restart {restart or stage}`) and run again")


def _ids(ids: pa.Array | pa.ChunkedArray) -> str:
    shown = [repr(i) for i in ids[:SHOWN].to_pylist()]
    return "first: " + ", ".join(shown) + (", ..." if len(ids) > SHOWN else "")


def _where(out: pa.Table, rejects: pa.Table, ids: pa.Array) -> str:
    """``'id' in part-a, part-b`` for each of ``ids`` (shards of the output and the rejects)."""
    parts = []
    for row_id in ids.to_pylist():
        files = [f"{name}{suffix}" for table, suffix in ((out, ""), (rejects, " (rejects)"))
                 for name in table.filter(pc.equal(table["id"], row_id))[FILE].to_pylist()]
        parts.append(f"{row_id!r} in {', '.join(files)}")
    return "; ".join(parts)


def _missing_data(folder: str, index: pa.Table) -> list[str]:
    """The shards of ``folder`` whose index lists rows but whose data object is not there."""
    if not index.num_rows:
        return []
    listed = set(pc.unique(index[FILE].cast(pa.string())).to_pylist())
    present = set(storage.list_files(folder, prefix="part-"))
    return sorted(listed - present)
