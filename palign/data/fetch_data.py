"""``palign fetch-data NAME --to PATH_OR_URI``: the paper's training set and benchmarks, in the
columns the paper preset (``configs/paper/``) reads.

Each dataset is loaded with ``datasets`` (from the Hugging Face hub, on a machine that reaches it,
or from a folder saved with ``save_to_disk`` given as ``source``), its columns renamed, and
written as one Parquet file ``<to>/<name>.parquet`` (a local folder or an ``s3://``/``gs://``
URI). Columns written: ``id``, ``question``, and ``answer`` (a benchmark's final answer) or
``solution`` (s1K-1.1's worked solution, whose final answer align finds: ``align.gold:
solution``), plus s1K-1.1's teacher text, ``cot`` (DeepSeek-R1's thinking) and ``attempt`` (its
answer after the thinking). Numeric answers become text (``142.0`` -> ``142``). Where a set has
no unique id column, rows are named ``<name>-<row number>``.

The hub ids are the ones the authors' repository names (s1K-1.1, MATH-500) or whose rows match
the test files the authors committed (AIME 2024: 30 rows; AMC 12: the 83 problems of
``AI-MO/aimo-validation-amc``); AIME 2025's source is not named by the authors, and
``math-ai/aime25`` (30 rows, problem and answer) is a common choice, not verified.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

from palign.data import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    hub_id: str
    split: str
    columns: dict[str, str]  # our column -> the dataset's
    id_column: str | None = None  # a unique id column; None: <name>-<row number>
    rows: int | None = None  # how many rows the set has (checked when fetched whole)
    note: str = ""


DATASETS: dict[str, Source] = {
    "s1k-1.1": Source("simplescaling/s1K-1.1", "train",
                      {"question": "question", "solution": "solution",
                       "cot": "deepseek_thinking_trajectory", "attempt": "deepseek_attempt"},
                      rows=1000, note="the training set: DeepSeek-R1 trajectories"),
    "aime24": Source("HuggingFaceH4/aime_2024", "train",
                     {"question": "problem", "answer": "answer"}, id_column="id", rows=30),
    "aime25": Source("math-ai/aime25", "test", {"question": "problem", "answer": "answer"},
                     rows=30, note="source not named by the authors; a common choice"),
    "amc12": Source("AI-MO/aimo-validation-amc", "train",
                    {"question": "problem", "answer": "answer"}, rows=83,
                    note="AMC 12 2022-2023, the 83 problems the authors used (its id column "
                         "repeats)"),
    "math500": Source("HuggingFaceH4/MATH-500", "test",
                      {"question": "problem", "answer": "answer", "solution": "solution"},
                      id_column="unique_id", rows=500),
}


def answer_text(value: Any) -> Any:
    """A numeric answer as text (an integral float without its ``.0``); others unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def load(name: str, source: str | None = None) -> Any:
    """The dataset ``name`` as a ``datasets.Dataset``: from ``source`` (a folder saved with
    ``save_to_disk``, holding a Dataset or a DatasetDict with the split) or from the hub."""
    import datasets

    spec = DATASETS[name]
    if source is None:
        return datasets.load_dataset(spec.hub_id, split=spec.split)
    loaded = datasets.load_from_disk(source)
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise ValueError(f"{source}: no split {spec.split!r} (it has {list(loaded)})")
        return loaded[spec.split]
    return loaded


def convert(name: str, dataset: Any, limit: int | None = None) -> Any:
    """The rows of ``dataset`` in the preset's columns, as a pyarrow table."""
    import pyarrow as pa

    spec = DATASETS[name]
    missing = [c for c in [*spec.columns.values(), spec.id_column] if c and
               c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: the data has no column {', '.join(missing)} (it has "
                         f"{', '.join(dataset.column_names)})")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    out: dict[str, list[Any]] = {
        "id": ([str(v) for v in dataset[spec.id_column]] if spec.id_column
               else [f"{name}-{i:04d}" for i in range(len(dataset))])}
    for ours, theirs in spec.columns.items():
        values = list(dataset[theirs])  # a column at a time, not a row at a time
        out[ours] = [answer_text(v) for v in values] if ours == "answer" else values
    return pa.table(out)


def fetch(name: str, to: str, source: str | None = None, limit: int | None = None) -> str:
    """Fetch ``name`` and write ``<to>/<name>.parquet``; its path."""
    import pyarrow.parquet as pq

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    dataset = load(name, source)
    table = convert(name, dataset, limit)
    if limit is None and spec.rows is not None and table.num_rows != spec.rows:
        log.warning("%s: %d rows, where the paper's set has %d", name, table.num_rows, spec.rows)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    target = storage.join(storage.absolute(to), f"{name}.parquet")
    storage.write_bytes(target, sink.getvalue())
    log.info("%s: %d rows from %s written to %s", name, table.num_rows,
             source or f"{spec.hub_id} ({spec.split})", target)
    return target
