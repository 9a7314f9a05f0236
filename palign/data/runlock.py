"""One run per output folder: a run holds ``<output_dir>/_LOCK`` from start to end.

Two drivers on one folder would serve the same rows twice and delete each other's temporary
files, so the second refuses to start and names the holder (host, pid, start time). The holder
touches the lock every few seconds; a lock whose holder stopped touching it ``stale_s`` ago, or
whose process on this same host is gone, was left by a dead run and is taken over.

The lock file is made with ``O_CREAT | O_EXCL``, which is atomic on local and NFS v3+ file
systems; a stale one is first renamed to a unique name, so two runs taking over at once cannot
both win. Its age is its modification time's.

On object storage (``s3://``, ``gs://``) every write of the lock is conditional
(``palign.data.conditional``): it is created only if there is none (S3 ``If-None-Match: *``,
GCS generation 0), and each heartbeat rewrites it only if it is still the version this run last
wrote (S3 ``If-Match`` on its ETag, GCS its generation). The store decides, so of two runs that
start at once exactly one gets the lock, however late either write lands, and a heartbeat that
finds its version replaced has lost the lock. A stale lock is taken over by a write conditioned
on the version that was read as stale, never deleted and made again: if its holder beat in the
meantime, the takeover fails. Its age is the store's: the object's last-modified time against
the store's current time from the same answer, so no writer's clock counts. At the end the lock
is deleted only if it is still the version this run wrote.

A holder that stops beating for ``stale_s`` (a paused VM, a driver stuck that long) can find,
when it wakes, that another run has taken the folder over. It must not go on beside that run:
its heartbeat interrupts the main thread (as Ctrl-C would, so blocking Ray calls end too) and
the run ends with ``LockLost``, a failure, whatever the block was doing. A process started with
SIGINT ignored (``cmd &`` in a script, ``nohup``) would sleep through that interrupt, so while
the lock is held such a process gets a handler that acts on it only once the lock is lost: a
Ctrl-C is ignored as before.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from palign.common.failures import StageFailed
from palign.data import conditional, storage

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


@dataclass(frozen=True)
class _Holder:
    """The lock as read: its content, seconds since its last heartbeat, and (object storage)
    the version read, which a takeover is conditioned on."""

    info: dict[str, Any]
    age: float
    tag: str | None = None


class RunLock:
    """``with RunLock(output_dir, stale_s):`` holds the folder for the block."""

    def __init__(self, folder: str | Path, stale_s: float = 300.0,
                 heartbeat_s: float | None = None) -> None:
        self.remote = storage.is_uri(folder)
        self.folder = str(folder) if self.remote else Path(folder)
        self.path = storage.join(folder, LOCK_NAME) if self.remote else self.folder / LOCK_NAME
        self.stale_s = float(stale_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(30.0, stale_s / 5)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # who took the lock over, once someone has
        self._info: dict[str, Any] = {}  # what the lock says: set on acquiring
        self._object: conditional.ConditionalObject | None = None  # object storage: the lock
        self._tag: str | None = None  # object storage: the version of the lock we last wrote
        self._seq = 0  # object storage: our writes of the lock, so each version differs
        self._sigint: Any = None  # the SIGINT disposition we replaced while holding, if any

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
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started": datetime.now(UTC).isoformat(timespec="seconds")}
        if self.remote and self._object is None:
            self._object = conditional.open_object(str(self.path))
        for _ in range(5):
            if self._create():
                self._start()
                return
            holder = self._holder()
            if holder is None:
                continue  # it went away between our two looks
            if self.remote and holder.info.get("token") == self.token:
                self._tag = holder.tag  # our create landed, but its answer did not reach us
                self._start()
                return
            why = self._stale(holder)
            if why is None:
                raise RunLocked(
                    f"{self.folder} is in use by another palign run: {_describe(holder)}. "
                    "Wait for it to finish, stop it, or choose another run.output_dir (a lock "
                    f"left by a run that died is taken over after run.lock_stale_s="
                    f"{self.stale_s:g} s without a heartbeat).")
            log.warning("taking over %s from a run that is gone (%s): %s", self.path, why,
                        _describe(holder))
            if self._break(holder):
                self._start()
                return
        raise RunLocked(f"could not take {self.path}: other runs keep taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._disarm()
        if not self.remote:
            holder = self._holder()
            if holder is not None and holder.info.get("token") == self.token:
                storage.delete(self.path)
            return
        if self._object is None or self._tag is None:
            return  # never held
        tag, self._tag = self._tag, None
        try:
            try:
                self._object.delete(tag)
            except conditional.Conflict:  # a heartbeat landed after we stopped waiting for it
                holder = self._holder()
                if holder is not None and holder.info.get("token") == self.token:
                    self._object.delete(str(holder.tag))
        except (OSError, conditional.Conflict) as err:
            log.warning("could not remove %s (%s): the next run takes it over after "
                        "run.lock_stale_s=%g s", self.path, err, self.stale_s)

    # -- parts ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._arm()
        self._thread = threading.Thread(target=self._beat, name="palign-run-lock", daemon=True)
        self._thread.start()

    def _arm(self) -> None:
        """Make sure the heartbeat's interrupt is heard: a process whose SIGINT is ignored or
        left to the system gets, while it holds the lock, a handler that raises only once the
        lock is lost. Only the main thread can set handlers; a Python handler stays as it is."""
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        if callable(current):
            return
        self._sigint = current
        signal.signal(signal.SIGINT, self._on_sigint)

    def _disarm(self) -> None:
        if self._sigint is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._sigint)
        self._sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.lost is not None or self._sigint == signal.SIG_DFL:
            raise KeyboardInterrupt  # the lock is lost (or Ctrl-C, which would have ended it)
        # SIGINT was ignored before this lock was taken: a Ctrl-C still is

    def _content(self) -> bytes:
        """The lock object's next version: who holds it, and a count that makes each version's
        bytes (hence its ETag) differ from every earlier one."""
        self._seq += 1
        return json.dumps({**self._info, "seq": self._seq}).encode()

    def _create(self) -> bool:
        if self.remote:
            assert self._object is not None
            try:
                self._tag = self._object.create(self._content())
            except conditional.Conflict:
                return False
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _holder(self) -> _Holder | None:
        """The lock as it is now; None if there is none. On object storage a lock that cannot
        be read (the store failing) raises ``OSError``: it is neither free nor stale."""
        if self.remote:
            assert self._object is not None
            version = self._object.read()
            if version is None:
                return None
            return _Holder(_parse(version.data), version.age_s, version.tag)
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return _Holder(_parse(text), age)

    def _stale(self, holder: _Holder) -> str | None:
        if holder.age > self.stale_s:
            return f"no heartbeat for {holder.age:.0f} s"
        pid = holder.info.get("pid")
        if (holder.info.get("host") == socket.gethostname() and isinstance(pid, int)
                and not _alive(pid)):
            return f"process {pid} on this host has exited"
        return None

    def _break(self, holder: _Holder) -> bool:
        """Remove a stale lock; on object storage, take it over. True if this run now holds
        it (object storage), False to try creating it again."""
        if self.remote:
            assert self._object is not None and holder.tag is not None
            try:
                self._tag = self._object.replace(self._content(), holder.tag)
            except conditional.Conflict:
                return False  # it changed since it was read stale: look again
            return True
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # someone else broke it first
        aside.unlink(missing_ok=True)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                lost = self._refresh_remote() if self.remote else self._refresh_local()
            except Exception:  # the store failing now: try again at the next beat
                log.warning("could not refresh %s", self.path, exc_info=True)
                continue
            if lost is not None:
                self.lost = lost
                log.error("%s was taken over by another run while this one held it (%s): "
                          "stopping this run", self.path, lost)
                # Ctrl-C, aimed at the main thread: sent to the process, the kernel may hand it
                # to this thread instead, and the main thread would sleep on in its blocking call
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def _refresh_local(self) -> str | None:
        """Touch the lock if it is still ours; who holds it instead, if not."""
        holder = self._holder()
        if holder is None or holder.info.get("token") != self.token:
            return _describe(holder) if holder is not None else "its lock was removed"
        os.utime(self.path)
        return None

    def _refresh_remote(self) -> str | None:
        """Rewrite the lock on the condition that it is the version we last wrote; who holds
        it instead, if it is not."""
        assert self._object is not None and self._tag is not None
        try:
            self._tag = self._object.replace(self._content(), self._tag)
            return None
        except conditional.Conflict:
            holder = self._holder()
        if holder is not None and holder.info.get("token") == self.token:
            # Still ours: an earlier write of ours landed though its answer was lost (a retry,
            # a timeout), so the version we knew is not the last. Only this run writes its token.
            self._tag = holder.tag
            return None
        return _describe(holder) if holder is not None else "its lock was removed"


def _parse(data: bytes) -> dict[str, Any]:
    """A lock's content; {} for one being written right now, cut short by a crash, or not
    palign's."""
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(holder: _Holder) -> str:
    info = holder.info
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started', '?')}, last heartbeat {holder.age:.0f} s ago")
