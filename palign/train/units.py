"""The prepared training data's format, and a rank's reader of it.

Layout, under ``<output_dir>/train/data/<key>/``::

    windows/<stem>.bin       the units of one window, one after another; a unit is int32
                             [n_seq, seq_lens..., input_ids..., labels...] (no padding)
    windows/<stem>.parquet   that window's unit table and row counts: written last, its commit
    units.parquet            every unit in order: window, offset, size, real, supervised tokens
    plan.json                settings and totals: written last, the preparation's commit

A rank reads, for each unit of its micro-batches, the unit table's row group that lists it
(1024 units, 16 KiB; a few are cached) and the unit itself, each by a ranged read
(``UnitReader``); the step plan is computed position by position (``palign.train.steps``). So a
rank's memory holds the micro-batches in hand, whatever the corpus size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from palign.data import storage
from palign.train.data import IGNORE_INDEX, Example, Pack

VERSION = 1
DATA = "data"
WINDOWS = "windows"
PLAN = "plan.json"
UNITS = "units.parquet"
UNIT_GROUP = 1024  # units per row group of units.parquet


@dataclass(frozen=True)
class Prepared:
    """A committed preparation (what ``plan.json`` says)."""

    folder: str
    key: str
    n_units: int
    rows_used: int
    rows_rejected: int
    real_tokens: int
    unit_bytes: int  # the window files' total size
    seq_len: int
    packing: bool
    pad_id: int

    @property
    def packing_efficiency(self) -> float:
        """Real tokens over token slots (``packing: false``: the share of ``seq_len`` the rows
        fill on average, what packing would recover)."""
        return self.real_tokens / max(1, self.n_units * self.seq_len)


def load_prepared(folder: str) -> Prepared:
    return Prepared(**json.loads(storage.read_text(storage.join(folder, PLAN))))


def unit_arrays(members: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray:
    """One unit as stored: [n_seq, seq_lens..., input_ids..., labels...], every sequence's
    first label -100 (as ``palign.train.data.pack`` does)."""
    lens = np.array([len(m[1]) for m in members], np.int32)
    labels = [m[2].copy() for m in members]
    for lab in labels:
        lab[0] = IGNORE_INDEX
    return np.concatenate([np.array([len(members)], np.int32), lens,
                           *[m[1] for m in members], *labels]).astype(np.int32, copy=False)


# -- a rank's side ----------------------------------------------------------------------------

class UnitReader:
    """Reads single units of a preparation: the unit table by row groups (a few cached), the
    units by ranged reads of their window files. Holds no per-unit state for the whole corpus."""

    def __init__(self, folder: str, max_open: int = 8, max_groups: int = 4) -> None:
        self.prepared = load_prepared(folder)
        self.folder = folder
        fs, p = storage.resolve(storage.join(folder, UNITS))
        self._table_file = fs.open_input_file(p)
        self._table = pq.ParquetFile(self._table_file)
        self.windows: list[str] = json.loads(self._table.schema_arrow.metadata[b"windows"])
        self._group_rows = self._table.metadata.row_group(0).num_rows
        self._groups: dict[int, dict[str, np.ndarray]] = {}
        self._max_groups = max_groups
        self._open: dict[int, Any] = {}
        self._max_open = max_open

    def __len__(self) -> int:
        return self.prepared.n_units

    def _row(self, u: int) -> tuple[int, int, int]:
        """(window, byte offset, size in int32s) of unit ``u``."""
        cols, i = self._columns(u)
        return int(cols["window"][i]), int(cols["offset"][i]), int(cols["size"][i])

    def real_tokens(self, u: int) -> int:
        """Unit ``u``'s real (non-padding) tokens: a single example's length."""
        cols, i = self._columns(u)
        return int(cols["real"][i])

    def _columns(self, u: int) -> tuple[dict[str, np.ndarray], int]:
        """The unit table's columns of the row group holding unit ``u``, and its row there."""
        g, i = divmod(u, self._group_rows)
        cols = self._groups.pop(g, None)
        if cols is None:
            t = self._table.read_row_group(g, columns=["window", "offset", "size", "real"])
            cols = {c: t[c].to_numpy() for c in t.column_names}
            if len(self._groups) >= self._max_groups:
                self._groups.pop(next(iter(self._groups)))
        self._groups[g] = cols  # most recently used last
        return cols, i

    def _file(self, w: int) -> Any:
        f = self._open.pop(w, None)
        if f is None:
            fs, p = storage.resolve(storage.join(self.folder, WINDOWS,
                                                 self.windows[w] + ".bin"))
            f = fs.open_input_file(p)
            if len(self._open) >= self._max_open:
                self._open.pop(next(iter(self._open))).close()
        self._open[w] = f  # most recently used last
        return f

    def arrays(self, u: int) -> np.ndarray:
        """Unit ``u`` as stored: int32 [n_seq, seq_lens..., input_ids..., labels...]."""
        w, offset, size = self._row(u)
        return np.frombuffer(self._file(w).read_at(size * 4, offset), np.int32)

    def unit(self, u: int) -> Pack | Example:
        """Unit ``u`` as the loop collates it: a ``Pack`` padded to ``seq_len``, or (no
        packing) an ``Example``."""
        arr = self.arrays(u)
        n_seq = int(arr[0])
        lens = arr[1:1 + n_seq]
        n_real = int(lens.sum())
        ids = arr[1 + n_seq:1 + n_seq + n_real]
        labels = arr[1 + n_seq + n_real:]
        p = self.prepared
        if not p.packing:
            return Example(f"unit-{u}", ids.tolist(), labels.tolist())
        n_pad = p.seq_len - n_real
        positions = np.concatenate([*[np.arange(n) for n in lens], np.arange(n_pad)])
        return Pack([], [*ids.tolist(), *[p.pad_id] * n_pad],
                    [*labels.tolist(), *[IGNORE_INDEX] * n_pad], positions.tolist(),
                    lens.tolist())

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._table_file.close()
