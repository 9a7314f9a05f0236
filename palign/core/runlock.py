"""One run per output folder: a run holds ``<output_dir>/_LOCK`` from start to end.

Two drivers on one folder would serve the same rows twice and delete each other's temporary
files, so the second refuses to start and names the holder (host, pid, start time). The holder
touches the lock every few seconds; a lock whose holder stopped touching it ``stale_s`` ago, or
whose process on this same host is gone, was left by a dead run and is taken over.

The lock file is made with ``O_CREAT | O_EXCL``, which is atomic on local and NFS v3+ file
systems; a stale one is first renamed to a unique name, so two runs taking over at once cannot
both win. On object storage (``s3://``, ``gs://``), which has neither, the lock is an object
written and then read back after a pause: of two runs that write it at once, only the one whose
token survives goes on. The heartbeat is the time written in it.

A holder that stops beating for ``stale_s`` (a paused VM, a driver stuck that long) can find,
when it wakes, that another run has taken the folder over. It must not go on beside that run:
its heartbeat interrupts the main thread (as Ctrl-C would, so blocking Ray calls end too) and
the run ends with ``LockLost``, a failure, whatever the block was doing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from palign.core import storage
from palign.core.failures import StageFailed

log = logging.getLogger(__name__)

LOCK_NAME = "_LOCK"


class RunLocked(RuntimeError):
    """Another run holds the output folder."""


class LockLost(StageFailed):
    """Another run took the output folder over while this one held it (this one had stopped
    beating for ``stale_s``); this run stopped rather than write beside it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """``with RunLock(output_dir, stale_s):`` holds the folder for the block."""

    def __init__(self, folder: str | Path, stale_s: float = 300.0,
                 heartbeat_s: float | None = None, settle_s: float = 2.0) -> None:
        self.remote = storage.is_uri(folder)
        self.folder = str(folder) if self.remote else Path(folder)
        self.path = storage.join(folder, LOCK_NAME) if self.remote else self.folder / LOCK_NAME
        self.settle_s = settle_s  # object storage: how long a written lock must survive
        self.stale_s = float(stale_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(30.0, stale_s / 5)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # who took the lock over, once someone has

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        if self.lost is not None:
            raise LockLost(f"{self.folder} was taken over by another palign run ({self.lost}) "
                           "while this one held it: this run stopped. Its heartbeat had "
                           f"stopped for over run.lock_stale_s={self.stale_s:g} s (a paused "
                           "machine or a stuck driver); let the other run finish, or stop it "
                           "and run again") from exc

    def acquire(self) -> None:
        storage.make_dir(self.folder)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="palign-run-lock",
                                                daemon=True)
                self._thread.start()
                return
            holder = self._holder()
            if holder is None:
                continue  # it went away between our two looks
            info, age = holder
            why = self._stale(info, age)
            if why is None:
                raise RunLocked(
                    f"{self.folder} is in use by another palign run: {_describe(info, age)}. "
                    "Wait for it to finish, stop it, or choose another run.output_dir (a lock "
                    f"left by a run that died is taken over after run.lock_stale_s="
                    f"{self.stale_s:g} s without a heartbeat).")
            log.warning("taking over %s from a run that is gone (%s): %s", self.path, why,
                        _describe(info, age))
            self._break()
        raise RunLocked(f"could not take {self.path}: other runs keep taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._holder()
        if holder is not None and holder[0].get("token") == self.token:
            storage.delete(self.path)

    # -- parts ----------------------------------------------------------------------------

    def _create(self) -> bool:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": datetime.now(UTC).isoformat(timespec="seconds")}
        if self.remote:
            if storage.exists(self.path):
                return False
            self._write_remote(info)
            time.sleep(self.settle_s)  # another run writing at the same time overwrites ours
            holder = self._holder()
            return holder is not None and holder[0].get("token") == self.token
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _write_remote(self, info: dict[str, Any]) -> None:
        self._info = info
        storage.write_text(self.path, json.dumps({**info, "beat": time.time()}))

    def _holder(self, strict: bool = False) -> tuple[dict[str, Any], float] | None:
        """The lock's content and its age since the last heartbeat; None if there is none.
        ``strict``: a lock that cannot be read now (the store failing) raises, rather than
        reading as an unknown holder's."""
        if self.remote:
            try:
                info = json.loads(storage.read_text(self.path))
            except FileNotFoundError:
                return None
            except OSError:
                if strict:
                    raise
                info = {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                info = {}
            info = info if isinstance(info, dict) else {}
            return info, time.time() - float(info.get("beat", 0.0))
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:  # being written right now, or cut short by a crash
            info = {}
        return (info if isinstance(info, dict) else {}), age

    def _stale(self, info: dict[str, Any], age: float) -> str | None:
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return f"process {pid} on this host has exited"
        return None

    def _break(self) -> None:
        if self.remote:
            storage.delete(self.path)
            return
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._holder(strict=True)
                if holder is None or holder[0].get("token") != self.token:
                    self.lost = _describe(*holder) if holder is not None else "its lock was removed"
                    log.error("%s was taken over by another run while this one held it (%s): "
                              "stopping this run", self.path, self.lost)
                    os.kill(os.getpid(), signal.SIGINT)  # ends blocking calls, as Ctrl-C does
                    return
                if self.remote:
                    self._write_remote(self._info)
                else:
                    os.utime(self.path)
            except OSError:
                log.warning("could not refresh %s", self.path, exc_info=True)


def _describe(info: dict[str, Any], age: float) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started', '?')}, last heartbeat {age:.0f} s ago")
