"""Training data, prepared once: the align stage's rows tokenised and packed in parallel into
int32 token shards and a unit table on the run's storage; each rank reads only its own units.

The units' layout under ``<output_dir>/train/data/<key>/`` and a rank's reader of them are
``palign.train.units``. The rows that cannot be trained on go to ``<output_dir>/train/rejects/``,
one shard per window (committed by its index, named after the window, so a window done again
writes them once).

A window is a run of whole align shards, in name order, of at least ``train.pack_window`` rows.
Its rows are sorted by id, tokenised (``palign.train.data.build_example``) and packed
best-fit-decreasing within the window (``pack_lengths``), or with ``packing: false`` kept one
per unit. The windows are planned by the driver from the align index (shard names and row
counts, never rows), and done by Ray Data tasks, one per window, where the data are; only each
window's counts come back. A window already committed is not done again, so a preparation
killed midway continues where it stopped, and a retried task finds its own commit.

``key`` is a hash of everything the units depend on: the align shards (names and row counts),
the student (its tokenizer), ``seq_len``, ``overlong``, ``packing``, ``pack_window`` and this
format's version. The same align data and settings find the finished preparation and reuse it
(a resumed training run trains on exactly the units it started with); new ones prepare anew
in a new folder, after removing the old one and its rejects.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from palign.config import Config
from palign.data import storage
from palign.data.digest import read_index
from palign.data.layout import FILE, REJECTS
from palign.data.shards import read_committed, reject_columns, reject_row, write_shard
from palign.train.data import IGNORE_INDEX, Untrainable, build_example, pack_lengths
from palign.train.units import (
    DATA,
    PLAN,
    UNIT_GROUP,
    UNITS,
    VERSION,
    WINDOWS,
    Prepared,
    load_prepared,
    unit_arrays,
)

logger = logging.getLogger(__name__)



class NoTrainableRows(ValueError):
    """The align stage left nothing to train on (no rows, or every row rejected)."""


@dataclass(frozen=True)
class Settings:
    """What a window task needs (JSON-able: it travels to Ray Data tasks)."""

    student: str
    cache_dir: str | None
    seq_len: int
    overlong: str
    packing: bool  # units are packs (else single examples; a rows_per_step run packs per step)
    folder: str  # <output_dir>/train/data/<key>
    rejects: str  # <output_dir>/train/rejects
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # models.chat_template_kwargs


# -- the driver: plan, run, commit -------------------------------------------------------------

def data_root(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.stage_dir("train")), DATA)


def plan_windows(align: str, window_rows: int) -> list[tuple[str, list[str]]]:
    """(stem, align shard paths) per window: whole shards in name order, each window at least
    ``window_rows`` rows (the last one may be smaller). From the align index alone."""
    index = read_index(align, ("id",))
    counts = pc.value_counts(index[FILE].cast(pa.string())) if index.num_rows else []
    rows = sorted((c["values"].as_py(), c["counts"].as_py()) for c in counts)
    windows: list[tuple[str, list[str]]] = []
    names: list[str] = []
    total = 0
    for name, n in rows:
        names.append(name)
        total += n
        if total >= window_rows:
            windows.append((_stem(names), [storage.join(align, x) for x in names]))
            names, total = [], 0
    if names:
        windows.append((_stem(names), [storage.join(align, x) for x in names]))
    return windows


def _stem(names: Sequence[str]) -> str:
    return "w-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:20]


def packed_units(cfg: Config) -> bool:
    """Whether the prepared units are packs: with ``train.rows_per_step`` they are single
    examples, packed per step by the loop (a step's rows change every epoch)."""
    return cfg.train.packing and cfg.train.rows_per_step is None


def preparation_key(cfg: Config, windows: Sequence[tuple[str, list[str]]]) -> str:
    tc = cfg.train
    parts = {"version": VERSION, "student": cfg.models.student, "seq_len": tc.seq_len,
             "overlong": tc.overlong, "packing": packed_units(cfg), "window": tc.pack_window,
             "windows": [stem for stem, _ in windows]}
    if cfg.models.chat_template_kwargs:  # absent when empty: earlier preparations keep their key
        parts["template_kwargs"] = cfg.models.chat_template_kwargs
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: Config, use_ray: bool = True) -> Prepared:
    """Prepare (or find prepared) the training units for the align stage's current rows.

    With ``use_ray`` the windows are Ray Data tasks (one CPU each, as many at once as the
    cluster has CPUs for); without, this process does them one by one (torchrun's rank 0).
    Raises ``NoTrainableRows`` when nothing can be trained on.
    """
    tc = cfg.train
    align = storage.absolute(cfg.stage_dir("align"))
    windows = plan_windows(align, tc.pack_window)
    if not windows:
        raise NoTrainableRows(f"no aligned rows in {align}: run the align stage first")
    key = preparation_key(cfg, windows)
    root = data_root(cfg)
    folder = storage.join(root, key)
    rejects = storage.join(storage.absolute(cfg.stage_dir("train")), REJECTS)
    if storage.is_file(storage.join(folder, PLAN)):
        return load_prepared(folder)
    settings = Settings(cfg.models.student, cfg.models.cache_dir, tc.seq_len, tc.overlong,
                        packed_units(cfg), folder, rejects,
                        dict(cfg.models.chat_template_kwargs))
    done = {n.removesuffix(".parquet") for n in storage.list_files(
        storage.join(folder, WINDOWS), suffixes=(".parquet",))}
    if not done:  # a fresh start: the rejects and any other preparation are not this one's
        stale = [d for d in storage.list_dirs(root) if d != key]
        if stale:
            logger.info("train data: the align rows or settings changed; preparing anew")
        for old in stale:
            storage.delete_dir(storage.join(root, old))
        storage.delete_dir(rejects)
    todo = [(stem, paths) for stem, paths in windows if stem not in done]
    logger.info("train data: %d windows (%d already prepared), in %s", len(windows),
                len(windows) - len(todo), folder)
    if todo and use_ray:
        _run_ray(settings, todo)
    else:
        for stem, paths in todo:
            prepare_window(settings, stem, paths)
    return _commit(settings, [stem for stem, _ in windows])


def _run_ray(settings: Settings, todo: list[tuple[str, list[str]]]) -> None:
    import ray

    items = [{"stem": stem, "paths": json.dumps(paths)} for stem, paths in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _prepare_block, batch_size=1, batch_format="pyarrow", num_cpus=1,
        fn_kwargs={"settings": asdict(settings)})
    units = 0  # the tasks write the units; only each window's count comes back
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        units += int(pc.sum(batch["units"]).as_py() or 0)
    logger.info("train data: %d windows prepared, %d units", len(todo), units)


def _prepare_block(batch: pa.Table, settings: dict[str, Any]) -> pa.Table:
    s = Settings(**settings)
    counts = [prepare_window(s, stem, json.loads(paths))
              for stem, paths in zip(batch["stem"].to_pylist(), batch["paths"].to_pylist())]
    return pa.table({"stem": batch["stem"], "units": [c["units"] for c in counts]})


def _commit(s: Settings, stems: list[str]) -> Prepared:
    """Concatenate the windows' unit tables in window order into ``units.parquet``, then write
    ``plan.json`` (the commit)."""
    paths = [storage.join(s.folder, WINDOWS, stem + ".parquet") for stem in stems]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        tables = list(pool.map(_read_parquet, paths))  # one small object per window
    meta = [json.loads(t.schema.metadata[b"palign"]) for t in tables]
    units = pa.concat_tables([t.replace_schema_metadata(None).append_column(
        "window", pa.array(np.full(t.num_rows, i, np.int32))) for i, t in enumerate(tables)])
    rows_used = sum(m["rows_used"] for m in meta)
    rejected = sum(m["rows_rejected"] for m in meta)
    if rows_used == 0:
        raise NoTrainableRows(f"no trainable rows: all {rejected} aligned rows were rejected "
                              f"(see {s.rejects})")
    sink = io.BytesIO()  # small row groups: a rank reads the part of the table it needs
    pq.write_table(units.replace_schema_metadata({"windows": json.dumps(stems)}), sink,
                   row_group_size=UNIT_GROUP)
    storage.write_bytes(storage.join(s.folder, UNITS), sink.getvalue())
    prepared = Prepared(s.folder, storage.name(s.folder), units.num_rows, rows_used, rejected,
                        int(pc.sum(units["real"]).as_py()), int(pc.sum(units["size"]).as_py()) * 4,
                        s.seq_len, s.packing, meta[0]["pad_id"])
    storage.write_text(storage.join(s.folder, PLAN), json.dumps(asdict(prepared), indent=1))
    logger.info("train data: %d rows in %d units (%d rejected), packing efficiency %.3f",
                rows_used, prepared.n_units, rejected, prepared.packing_efficiency)
    return prepared


def _read_parquet(path: str) -> pa.Table:
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pq.read_table(f)


# -- one window (a Ray Data task, or in process) -----------------------------------------------

@functools.lru_cache(maxsize=2)
def _tokenizer(student: str, cache_dir: str | None) -> Any:
    """The student's tokenizer. A pinned hub student's comes from its tokenizer files alone:
    a preparation task may run on a node that trains nothing and needs none of the weights."""
    from transformers import AutoTokenizer

    from palign.common.modelref import split_revision
    from palign.engines.models import hub_cache, offline, resolve_model

    repo, revision = split_revision(student)
    if revision is not None:
        return AutoTokenizer.from_pretrained(repo, revision=revision, cache_dir=hub_cache(),
                                             local_files_only=offline())
    return AutoTokenizer.from_pretrained(resolve_model(student, cache_dir))


def pad_id_of(tokenizer: Any) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def tokenise_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], seq_len: int, overlong: str,
                  template_kwargs: dict[str, Any] | None = None
                  ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[dict[str, Any]]]:
    """(id, input_ids, labels) per trainable row, in id order, and the reject rows."""
    examples: list[tuple[str, np.ndarray, np.ndarray]] = []
    rejects: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: str(r.get("id"))):
        row_id = str(row.get("id"))
        if not isinstance(row.get("question"), str) or not isinstance(row.get("target"), str):
            rejects.append(reject_row(row_id, "train", "no question or target text", row))
            continue
        result = build_example(tokenizer, row["question"], row["target"], seq_len,
                               overlong, example_id=row_id,  # type: ignore[arg-type]
                               template_kwargs=template_kwargs)
        if isinstance(result, Untrainable):
            rejects.append(reject_row(row_id, "train", result.reason, row))
        else:  # int32 arrays at once: a window of long rows as Python ints would be 9x larger
            examples.append((row_id, np.asarray(result.input_ids, np.int32),
                             np.asarray(result.labels, np.int32)))
    return examples, rejects


def prepare_window(s: Settings, stem: str, paths: Sequence[str]) -> dict[str, int]:
    """Tokenise and pack one window; write its units, its rejects, then its unit table (the
    commit). A window already committed is left as it is (a retried task)."""
    table_path = storage.join(s.folder, WINDOWS, stem + ".parquet")
    if storage.is_file(table_path):
        return {"units": _read_parquet(table_path).num_rows}
    tokenizer = _tokenizer(s.student, s.cache_dir)
    rows = [row for path in paths for row in read_committed(path)]
    examples, rejects = tokenise_rows(tokenizer, rows, s.seq_len, s.overlong, s.template_kwargs)
    if s.packing:
        bins = pack_lengths([len(e[1]) for e in examples], s.seq_len)
    else:
        bins = [[i] for i in range(len(examples))]
    chunks: list[bytes] = []
    offsets, sizes, real, supervised = [], [], [], []
    offset = 0
    for members in bins:
        arr = unit_arrays([examples[i] for i in members])
        n_real = (len(arr) - 1 - len(members)) // 2
        offsets.append(offset)
        sizes.append(len(arr))
        real.append(n_real)
        supervised.append(int((arr[-n_real:][1:] != IGNORE_INDEX).sum()))
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    storage.write_bytes(storage.join(s.folder, WINDOWS, stem + ".bin"), b"".join(chunks))
    if rejects:
        write_shard(s.rejects, f"part-{stem}", rejects, "jsonl", reject_columns(rejects))
    meta = {"rows_used": len(examples), "rows_rejected": len(rejects),
            "pad_id": pad_id_of(tokenizer)}
    table = pa.table({"offset": pa.array(offsets, pa.int64()), "size": pa.array(sizes, pa.int32()),
                      "real": pa.array(real, pa.int32()),
                      "supervised": pa.array(supervised, pa.int32())})
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({"palign": json.dumps(meta)}), sink)
    storage.write_bytes(table_path, sink.getvalue())
    return {"units": len(bins)}
