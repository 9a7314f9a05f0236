"""``<stage_dir>/_SUMMARY.json``: what one finished stage run did, kept beside its output.

The driver prints a stage's summary and forgets it; the run report, ``palign plan --from`` and a
person reading a run folder later need its figures too: the counts, the wall time, and the
engine work behind them (tokens, the prefix cache's share, how long a replica took to start).
So each stage a run finishes leaves this small file (``palign.pipeline.run_one`` writes it).

It never holds the rejects' reasons: there can be a million; they stay in ``rejects/``. Its
name starts with ``_`` like ``_DONE`` and ``_index``: the data plane's cleaning touches only
``part-*`` and ``.tmp-*`` files and its digests read only ``_index/``, so the file is neither
removed nor counted as rows. A later run of the stage writes it again (``processed`` then
counts only the rows that run did: 0 for a run that found everything done).

Here, not in the Ray layer, so that the report code can read it (``palign.report`` sits
below ``palign.runtime``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from palign.data import storage

log = logging.getLogger(__name__)

SUMMARY_FILE = "_SUMMARY.json"
SUMMARY_FORMAT = "palign.summary/1"
# The engine figures every summary carries (zero where the stage ran no engine, as train):
# prompt tokens answered, how many of them the prefix caches served, the most requests one
# engine held at once, the slowest replica's start (its engine and grader built, in seconds;
# summed over evaluate's pools, which start one after another) and the tokens the stage's
# own records account for (``Stage.metrics``: generated or judged tokens).
ENGINE_KEYS = ("prompt_tokens", "cached_tokens", "peak_in_flight", "init_s", "work_tokens",
               "completion_tokens", "requests", "retries")  # the last two: remote engines


def summary_record(stage: str, *, rows_in: int, rows_out: int, rejected: int, skipped: int,
                   processed: int, wall_s: float, engine: Mapping[str, float],
                   stats: Mapping[str, Any], finished_at: str | None = None) -> dict[str, Any]:
    """The file's content: plain JSON (numpy numbers as Python ones, NaN and infinities as
    null, so that any JSON reader, a browser's included, takes it)."""
    return {
        "format": SUMMARY_FORMAT,
        "stage": stage,
        "rows_in": int(rows_in), "rows_out": int(rows_out), "rejected": int(rejected),
        "skipped": int(skipped), "processed": int(processed),
        "wall_s": _plain(round(float(wall_s), 3)),
        "engine": {k: _plain(round(float(v), 3) if k == "init_s" else v)
                   for k in ENGINE_KEYS for v in [engine.get(k, 0)]},
        "stats": {str(k): _plain(v) for k, v in stats.items()},
        "finished_at": finished_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def write_summary(stage_dir: str | Path, record: Mapping[str, Any]) -> str:
    """Write ``record`` (from ``summary_record``) to ``<stage_dir>/_SUMMARY.json``, a local
    folder or a URI, whole or not at all; returns where."""
    path = storage.join(stage_dir, SUMMARY_FILE)
    storage.write_text(path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    return path


def read_summary(stage_dir: str | Path) -> dict[str, Any] | None:
    """The summary a finished run left in ``stage_dir``; None when there is none (the stage
    never finished there) or when it is unreadable or of another format (logged)."""
    path = storage.join(stage_dir, SUMMARY_FILE)
    if not storage.is_file(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): ignored", path, err)
        return None
    if not isinstance(record, dict) or record.get("format") != SUMMARY_FORMAT:
        log.warning("%s is not a %s file: ignored", path, SUMMARY_FORMAT)
        return None
    return record


def _plain(value: Any) -> Any:
    """A value as plain JSON: numpy scalars as Python ones, non-finite floats as None, lists
    and mappings element by element, anything else as its text."""
    if hasattr(value, "tolist"):
        value = value.tolist()  # a numpy scalar or array
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
