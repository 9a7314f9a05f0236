"""Logging set-ups, all of them: the ``palign`` command's console, a benchmark's, a training
rank's, and an engine actor's (a console a person can read, the full logs in a file).

Ray streams every actor's stderr to the driver's console. An engine actor logs a great deal
that matters only when something is wrong (vLLM's start-up report, CPU tuning advice, library
deprecation warnings), so in an actor everything goes to a file in the Ray session's log folder
(``<session>/logs/palign-<name>-<pid>.log``, the folder chosen by ``palign.runtime.environment``)
and only palign's own lines, and errors from any
library, reach the console.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DRIVER_FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup_driver_logging(level: int = logging.INFO) -> None:
    """A command's console (``palign``, a benchmark: ``level=logging.WARNING``): records from
    ``level`` up, without a level column. A process that already has handlers keeps them."""
    logging.basicConfig(level=level, format=DRIVER_FORMAT)


def setup_rank_logging() -> None:
    """A training rank's console: palign's INFO lines and any library's errors, whether Ray
    Train set up this process's logging (its per-rank report lines go to its own files under
    the session's ``logs/train/``) or nobody did (torchrun)."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    logging.getLogger("palign").setLevel(logging.INFO)
    quiet_console()


FILE_ONLY = {"console": False}  # ``log.info(..., extra=FILE_ONLY)``: the log file only


class _ConsoleFilter(logging.Filter):
    """palign's records from INFO up, but those marked ``FILE_ONLY``; any other library's from
    ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        if record.name == "palign" or record.name.startswith("palign."):
            return record.levelno >= logging.INFO
        return record.levelno >= logging.ERROR


def quiet_console() -> None:
    """Keep this process's console (its stream handlers) to palign's lines and errors; handlers
    that write files keep everything. For Ray Train workers, whose logging Ray Train sets up
    (its per-rank report lines go to its files under the session's logs/train/)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
                handler.addFilter(_ConsoleFilter())


def setup_actor_logging(name: str, log_dir: Path) -> Path:
    """Route this actor process's logs: all of them to ``<log_dir>/palign-<name>-<pid>.log``,
    the lines a person needs to the console (see module doc). Call before the engine's library
    is imported (vLLM reads ``VLLM_CONFIGURE_LOGGING`` then). Returns the log file's path."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records go through ours
    path = log_dir / f"palign-{name}-{os.getpid()}.log"
    root = logging.getLogger()
    if getattr(root, "_palign_log_file", None) == str(path):
        return path
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_ConsoleFilter())
    root.addHandler(to_file)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library deprecation warnings: to the file
    root._palign_log_file = str(path)  # type: ignore[attr-defined]
    return path


class ProgressLine:
    """A stage's progress as log lines (off a terminal, where no progress bar is drawn): the
    rows done of those planned, rejects, rate and time left, at most one line every ``every_s``
    seconds and always the last. At a million rows in batches of 16 a line per batch would be
    62,500 lines per stage in ``ray job logs``."""

    def __init__(self, log: logging.Logger, stage: str, pending: int, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.stage, self.pending, self.every_s, self.clock = (
            log, stage, pending, every_s, clock)
        self.done = self.rejects = 0
        self.start = self.last = clock()

    def add(self, rows: int, rejects: int) -> None:
        """A finished batch of ``rows`` rows, ``rejects`` of them rejected."""
        self.done += rows
        self.rejects += rejects
        now = self.clock()
        if self.done < self.pending and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / (now - self.start) if now > self.start else 0.0
        left = f", {_duration((self.pending - self.done) / rate)} left" \
            if rate and self.done < self.pending else ""
        share = 100 * self.done / self.pending if self.pending else 100.0
        self.log.info("%s: %d/%d rows (%.0f%%), %d rejects, %.1f rows/s%s", self.stage,
                      self.done, self.pending, share, self.rejects, rate, left)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
