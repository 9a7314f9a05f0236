"""The rows the run report shows: a sample that reads a few shards, whatever the run's size.

The sampled stage is the last row stage with rows (align, else truncate, generate, ingest):
an align record already holds its truncate fields. Its index says, without reading a row,
which shard holds each row and the row's kind (its ``stratum``: align's grade, truncate's
verdict). Each kind gets a share of the sample (the rare ones first, so that a wrong answer
among a million right ones is still shown), shards are taken in the order of a hash of their
names until each kind's share is there, and only those shards are read: at most
``max_shards`` of them. The same run gives the same sample; a report does not change between
two builds of one folder.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from palign.data import storage
from palign.data.digest import read_index
from palign.data.layout import FILE, REJECTS
from palign.data.shards import read_committed, shard_index

log = logging.getLogger(__name__)

ROW_STAGES = ("align", "truncate", "generate", "ingest")  # the first with rows is sampled
REJECT = "reject"  # the stratum of a sampled reject


@dataclass
class Sampled:
    """A record shown, its kind, and its shard (relative to the run folder)."""

    record: dict[str, Any]
    kind: str
    shard: str


@dataclass
class RowSample:
    """What ``sample_rows`` took: the records and rejects shown, which data shards it read
    (names relative to the run folder), and what the whole stage holds."""

    stage: str | None
    rows: list[Sampled] = field(default_factory=list)
    rejects: list[Sampled] = field(default_factory=list)
    shards_read: list[str] = field(default_factory=list)
    shards_total: int = 0
    rows_total: int = 0
    strata: dict[str, int] = field(default_factory=dict)  # kind -> rows in the whole stage
    data_shards_read: int = 0  # of ``shards_read``, those of the stage's rows (not rejects)
    unreadable: list[str] = field(default_factory=list)  # shards read in vain, and why


def rank(text: str) -> bytes:
    """A fixed pseudo-random order (a hash), the same in every build and every process."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def stratum_of(stage: str, value: Any) -> str:
    """The kind of a row from its stage's index value: align's grade (right, wrong,
    unchecked), truncate's verdict (enough, not enough); ``row`` for other stages."""
    if stage == "align":
        return str(value) if value else "unchecked"
    if stage == "truncate":
        return "enough" if value in (True, "true", "True") else "not enough"
    return "row"


STRATUM_COLUMN = {"align": "grade", "truncate": "sufficient"}


def quotas(available: dict[str, int], want: int) -> dict[str, int]:
    """``want`` rows shared between the kinds as evenly as each kind's rows allow (a kind
    with fewer rows than its even share gives the rest to the others)."""
    got = dict.fromkeys(available, 0)
    left = want
    active = sorted((s for s in available if available[s] > 0), key=lambda s: available[s])
    while left > 0 and active:
        share = max(1, left // len(active))
        for s in list(active):
            take = min(share, available[s] - got[s], left)
            got[s] += take
            left -= take
            if got[s] >= available[s]:
                active.remove(s)
            if not left:
                break
    return got


def choose_shards(per_shard: dict[str, Counter], want: dict[str, int],
                  max_shards: int) -> list[str]:
    """The shards to read: the kinds short of their quota take turns (the rarest first in
    each turn), each taking the hash-first shard not yet taken that holds it; at most
    ``max_shards`` in all, so that one kind spread thinly cannot use them all up."""
    ranked = sorted(per_shard, key=rank)
    totals: Counter = Counter()
    for counts in per_shard.values():
        totals.update(counts)
    queues = {k: [n for n in ranked if per_shard[n].get(k)] for k in want}
    chosen: list[str] = []
    taken: set[str] = set()
    have: Counter = Counter()
    while len(chosen) < max_shards:
        short = [k for k in sorted(want, key=lambda k: (totals[k], k))
                 if have[k] < want[k] and queues[k]]
        if not short:
            break
        for kind in short:
            queue = queues[kind]
            while queue and queue[0] in taken:
                queue.pop(0)
            if not queue or have[kind] >= want[kind] or len(chosen) >= max_shards:
                continue
            name = queue.pop(0)
            chosen.append(name)
            taken.add(name)
            have.update(per_shard[name])
    return chosen


def _read_all(folder: str, names: Sequence[str], unreadable: list[str]
              ) -> list[list[dict[str, Any]]]:
    """The committed rows of shards ``names`` of ``folder``, a few at a time (object
    storage answers each read after a round trip); a shard that cannot be read gives no
    rows, and its name and why go into ``unreadable`` (the page says so)."""
    def one(name: str) -> list[dict[str, Any]]:
        try:
            return read_committed(storage.join(folder, name))
        except (OSError, ValueError) as err:
            log.warning("report.html: shard %s/%s left out: %s", folder, name, err)
            unreadable.append(f"{storage.name(folder)}/{name}: {err}")
            return []

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return list(pool.map(one, names))


def _per_shard(index: pa.Table, kinds: pa.Array) -> dict[str, Counter]:
    """Rows of each kind in each shard, from the index (counted in numpy, by the two
    columns' dictionary codes)."""
    files = pc.cast(index[FILE], pa.string()).combine_chunks().dictionary_encode()
    coded = kinds.dictionary_encode()
    n_kinds = len(coded.dictionary)
    codes = files.indices.to_numpy().astype(np.int64) * n_kinds + coded.indices.to_numpy()
    counts = np.bincount(codes, minlength=len(files.dictionary) * n_kinds)
    names, labels = files.dictionary.to_pylist(), coded.dictionary.to_pylist()
    out: dict[str, Counter] = {}
    for code in np.flatnonzero(counts).tolist():
        out.setdefault(names[code // n_kinds], Counter())[labels[code % n_kinds]] = \
            int(counts[code])
    return out


def _kinds(stage: str, index: pa.Table) -> pa.Array:
    """Each index row's kind, as one string array (no Python loop over the rows)."""
    column = STRATUM_COLUMN.get(stage)
    if column is None or column not in index.column_names or \
            index[column].null_count == index.num_rows:
        return pa.array(np.full(index.num_rows, "row", dtype=object), pa.string())
    values = index[column].combine_chunks()
    if stage == "truncate":
        as_bool = pc.cast(values, pa.bool_()) if not pa.types.is_boolean(values.type) \
            else values
        return pc.if_else(pc.fill_null(as_bool, False), "enough", "not enough")
    return pc.fill_null(pc.cast(values, pa.string()), "unchecked")


def sample_rows(output_dir: str, want: int = 200, max_shards: int = 32, max_rejects: int = 20,
                reject_shards: int = 4) -> RowSample:
    """Sample ``want`` rows (and up to ``max_rejects`` rejects) of the run's last row stage,
    reading at most ``max_shards`` data shards in all (``reject_shards`` of them rejects)."""
    for stage in ROW_STAGES:
        folder = storage.join(output_dir, stage)
        if not storage.is_dir(storage.join(folder, "_index")):
            continue
        index = read_index(folder, (STRATUM_COLUMN.get(stage, "id"),))  # "id": any column
        if index.num_rows:
            return _sample_stage(output_dir, stage, index, want, max_shards, max_rejects,
                                 reject_shards)
    return RowSample(stage=None)


def _sample_stage(output_dir: str, stage: str, index: pa.Table, want: int, max_shards: int,
                  max_rejects: int, reject_shards: int) -> RowSample:
    folder = storage.join(output_dir, stage)
    kinds = _kinds(stage, index)
    per_shard = _per_shard(index, kinds)
    strata: Counter = Counter()
    for counts in per_shard.values():
        strata.update(counts)
    budget = max(1, max_shards - min(reject_shards, max_shards // 4))
    chosen = choose_shards(per_shard, quotas(dict(strata), want), budget)
    by_kind: dict[str, list[tuple[bytes, Sampled]]] = {}
    unreadable: list[str] = []
    for name, rows in zip(chosen, _read_all(folder, chosen, unreadable)):
        kind_of = _kinds_of(stage, storage.join(folder, name))
        for row in rows:
            rid = str(row.get("id"))
            kind = kind_of.get(rid, "row")
            by_kind.setdefault(kind, []).append((rank(rid), Sampled(row, kind,
                                                                    f"{stage}/{name}")))
    take = quotas({k: len(v) for k, v in by_kind.items()}, want)
    ranked = sorted((r for k, rows in by_kind.items()
                     for r in sorted(rows, key=lambda r: r[0])[:take[k]]), key=lambda r: r[0])
    picked = [s for _, s in ranked]
    sample = RowSample(stage=stage, rows=picked, shards_read=[f"{stage}/{n}" for n in chosen],
                       shards_total=len(per_shard), rows_total=index.num_rows,
                       strata=dict(strata), data_shards_read=len(chosen),
                       unreadable=unreadable)
    room = max(0, min(reject_shards, max_shards - len(chosen)))
    _sample_rejects(sample, storage.join(folder, REJECTS), f"{stage}/{REJECTS}", max_rejects,
                    room)
    return sample


def _kinds_of(stage: str, shard: str) -> dict[str, str]:
    """id -> kind for the rows of one shard, from its own index (the stage's whole index
    is never turned into Python)."""
    column = STRATUM_COLUMN.get(stage)
    index = shard_index(shard)
    kinds = _kinds(stage, index) if column in index.column_names else \
        pa.array(["row"] * index.num_rows, pa.string())
    return dict(zip((str(i) for i in index["id"].to_pylist()), kinds.to_pylist()))


def _sample_rejects(sample: RowSample, folder: str, prefix: str, want: int, room: int) -> None:
    """Up to ``want`` rejects from at most ``room`` hash-first reject shards, their reasons
    taken in turn (by the text before the first ':'), so that one reason does not fill it."""
    if want <= 0 or room <= 0 or not storage.is_dir(storage.join(folder, "_index")):
        return
    index = read_index(folder, ("kind",))  # any one column: the rows of each shard
    counts = {v["values"]: v["counts"] for v in pc.value_counts(
        pc.cast(index[FILE], pa.string()).combine_chunks()).to_pylist()}
    chosen: list[str] = []
    for name in sorted(counts, key=rank):
        if len(chosen) >= room or sum(counts[n] for n in chosen) >= want:
            break
        chosen.append(name)
    groups: dict[str, list[tuple[bytes, Sampled]]] = {}
    for name, rows in zip(chosen, _read_all(folder, chosen, sample.unreadable)):
        for row in rows:
            groups.setdefault(reason_group(str(row.get("reason"))), []).append(
                (rank(str(row.get("id"))), Sampled(row, REJECT, f"{prefix}/{name}")))
    sample.rejects = _in_turn([[s for _, s in sorted(g, key=lambda r: r[0])]
                               for g in groups.values()], want)
    sample.shards_read += [f"{prefix}/{n}" for n in chosen]


def _in_turn(groups: list[list[Sampled]], want: int) -> list[Sampled]:
    out: list[Sampled] = []
    depth = 0
    while len(out) < want and any(depth < len(g) for g in groups):
        out += [g[depth] for g in groups if depth < len(g)][:want - len(out)]
        depth += 1
    return out


def reason_group(reason: str) -> str:
    """A reject reason's group: the text before its first ':', its numbers as '#', so that
    ``judge at k=3: timeout`` and ``judge at k=7: timeout`` are counted together."""
    head = reason.split(":", 1)[0].strip() or reason.strip()
    return re.sub(r"\d+", "#", head)
