"""Whose fault a failure is: the row's, or the machinery's. Pure: no Ray, no engine.

- A **row fault** (a prompt too long for the context, unparseable input, a grading time-out, an
  exception our own code raises on one row's data) makes a reject of ``kind: row`` and the stage
  goes on. A rerun does not retry it unless asked (``run.retry_rejects: all``).
- A **machinery fault** (an engine that raises or dies, a CUDA error, out of memory, a model that
  does not load, a grading worker that cannot start) is a :class:`MachineryError`. It is never
  turned into rejects: it reaches Ray, which restarts the actor and retries the batch.
- A row whose batch keeps killing the machinery while the engine is otherwise sound (a *poison
  row*) is retried a bounded number of times, then rejected with ``kind: system`` and the crash
  as its reason, so the stage goes on; a rerun retries ``system`` rejects by default.
- A stage that cannot go on (an engine that keeps failing its health check, too many rejects, no
  rows out) raises :class:`StageFailed`, whose message is what the user reads.
- A config that cannot run is a :class:`ConfigError`, raised before any work.
- Storage: a store that keeps failing through its retries is :class:`StorageUnavailable` (the
  machinery's fault); a full disk is :class:`DiskFull` (the stage fails, naming the folder).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

ROW = "row"
SYSTEM = "system"
REJECT_KINDS = (ROW, SYSTEM)

_MAX_REASON = 600
# Exceptions that mean the process or device is no longer sound, whatever raised them.
_FATAL_NAMES = {"EngineDeadError", "OutOfMemoryError", "MemoryError", "AcceleratorError"}
_FATAL_TEXT = ("CUDA error", "CUBLAS_STATUS", "NCCL error", "out of memory", "device-side assert")


class ConfigError(ValueError):
    """A config that cannot run; the message names each offending field. The user's to fix,
    before any work starts. Here, not in ``palign.config``, so that what the config names by
    import path (``palign.common.plugins``) can say which field is wrong without importing the
    config; ``palign.config`` re-exports it."""


class MachineryError(RuntimeError):
    """A failure of the machinery, not of the row being served: the actor must restart and the
    batch be retried; the rows in flight are never rejected for it."""


class EngineFailure(MachineryError):
    """The inference engine raised, or failed its health check."""


class GraderUnavailable(MachineryError):
    """The grading worker process cannot be started."""


class StageFailed(RuntimeError):
    """A stage that must not report success; the message says why, for a person to read."""


class StorageUnavailable(MachineryError, OSError):
    """A store that kept failing with errors that usually pass (throttling, 5xx, time-outs,
    dropped connections) through every retry (``palign.data.retrying``). The machinery's
    fault, never a row's: an ``OSError`` still for code that handles storage errors."""


class DiskFull(StageFailed, OSError):
    """No space left on the disk a run writes to. The stage fails at once (waiting frees no
    space), naming the folder; nothing half-written is kept, and a rerun after space is freed
    resumes."""


def describe(err: BaseException) -> str:
    """``Type: message`` on one line, cut to a length a rejects file and a log line can hold."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def is_machinery(err: BaseException) -> bool:
    """True for failures that say the machinery, not the row, is at fault (see module doc)."""
    if isinstance(err, (MachineryError, MemoryError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _FATAL_NAMES:
        return True
    text = str(err)
    return any(marker in text for marker in _FATAL_TEXT)


def reason_shape(reason: str) -> str:
    """A reason with its numbers blanked, so that rejects of one cause count together
    ("prompt too long: 5013 tokens" and "... 6120 tokens" are one reason)."""
    return re.sub(r"\d+(\.\d+)?", "N", reason or "")[:200]


def commonest_reasons(reasons: Iterable[str], top: int = 3) -> list[tuple[str, int]]:
    """The ``top`` most frequent reason shapes, with their counts."""
    return Counter(reason_shape(r) for r in reasons).most_common(top)


def reject_share_error(stage: str, field: str, rows_out: int, rejected: int, limit: float,
                       reasons: Iterable[str]) -> str | None:
    """The message a stage fails with when its rejects pass ``limit`` (a share of all its rows),
    or when it produced no rows at all; None when it is fine."""
    total = rows_out + rejected
    if total == 0:
        return f"{stage} had no rows to work on: nothing came out of the stage before it"
    share = rejected / total
    if rows_out > 0 and share <= limit:
        return None
    common = "; ".join(f"{n} x {shape!r}" for shape, n in commonest_reasons(reasons))
    return (f"{stage} rejected {rejected} of {total} rows ({share:.0%}), over {field}={limit}"
            f"{' (no row came out)' if rows_out == 0 else ''}; commonest reasons: {common}")
