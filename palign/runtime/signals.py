"""Stopping a run by signal: SIGTERM (``ray job stop``, a pod's shutdown, ``kill``) and SIGINT
(Ctrl-C) end a ``palign`` run the same way.

Inside :func:`stop_on_signals` either signal raises :class:`Stopped` (a KeyboardInterrupt) in
the main thread, where the driver waits on Ray: a blocking Ray call checks for signals, so it
ends too, raising a plain KeyboardInterrupt (:func:`stop_from` names the signal again). The
exception unwinds the run as any failure does: the stage's committed shards stay (a commit is
data first, its index last, so a batch cut short is invisible), the run lock is released and
the command exits 128 + the signal's number (143, 130), so a rerun starts at once and resumes.

What would get in the way is handled here:

- ``ray.init`` sets a SIGTERM handler of its own in the driver (``sys.exit(15)``) and Ray's core
  worker a crash handler that prints a stack dump; ``init_ray`` runs it in :func:`reclaimed`,
  which puts palign's handlers back after it and turns Ray's exit during it into ``Stopped``.
  Ray Train's ``fit`` sets a Ctrl-C handler that aborts the training run and exits 0: the train
  stage runs in ``reclaimed`` too, so that exit is a stop as well.
- A signal that lands while the run lock is being taken or released would leave a lock behind
  (on object storage, one that refuses the next run for ``run.lock_stale_s``): :func:`shielded`
  enters and leaves a context manager with stops held back until it is done.

The run lock's heartbeat stops a run that lost its lock with SIGINT (``palign.data.runlock``):
that too raises ``Stopped`` here, and the lock's exit turns it into ``LockLost``, a failure.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal. A KeyboardInterrupt: no ``except Exception`` on the way
    (a stage's failure handling, Ray's wrappers) takes it for a failure of the work, and a
    blocking Ray call (``ray.get``) ends on it, as on Ctrl-C; it raises a plain
    KeyboardInterrupt in its place, which :func:`stop_from` turns back into this."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


_active = False  # inside stop_on_signals (in the main thread)
_held = 0  # depth of held() sections
_pending: int | None = None  # a signal that arrived while held
_received: int | None = None  # the signal that stopped the run


def _handle(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _held:
        _pending = _pending or signum
        return
    _stop(signum)


def _stop(signum: int) -> None:
    global _received
    _received = _received or signum
    raise Stopped(signum)


def stop_from(err: KeyboardInterrupt) -> Stopped:
    """The stop that ``err`` stands for: itself, or (for the plain KeyboardInterrupt that a
    blocking Ray call raises when a signal handler interrupts it) the signal that came."""
    if isinstance(err, Stopped):
        return err
    return Stopped(_received or signal.SIGINT)


def _install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def active() -> bool:
    """Whether a run has asked for palign's handlers (and this is its main thread)."""
    return _active and _main_thread()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise :class:`Stopped`; the previous handlers come back
    after. Only the main thread can set handlers: elsewhere this does nothing."""
    global _active, _pending, _received
    if not _main_thread() or _active:
        yield
        return
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _active, _pending, _received = True, None, None
    _install()
    try:
        yield
    finally:
        _active = False
        for signum, handler in saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def reclaim() -> None:
    """Put palign's handlers back after a library replaced them (``ray.init`` sets Ray's
    SIGTERM handler, its core worker a stack-dumping one). Does nothing outside a run."""
    if active():
        _install()


@contextmanager
def reclaimed(exit_is: int = signal.SIGTERM) -> Iterator[None]:
    """Around a call that sets handlers of its own: palign's are put back after it
    (:func:`reclaim`), and the ``SystemExit`` that such a handler raises when its signal comes
    first is a :class:`Stopped` by ``exit_is`` (Ray's SIGTERM handler, set early in ``ray.init``,
    exits with 15; Ray Train's Ctrl-C handler, set in ``fit``, aborts the training run and then
    exits with 0)."""
    try:
        yield
    except SystemExit:
        if not active():
            raise
        _stop(exit_is)
    finally:
        reclaim()


@contextmanager
def held(raise_pending: bool = True) -> Iterator[None]:
    """Within: a stop waits. Leaving, a signal that arrived meanwhile raises :class:`Stopped`
    (unless ``raise_pending`` is false: something else already ends the run)."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    signum = _take_pending()
    if signum is not None and raise_pending:
        _stop(signum)


def _take_pending() -> int | None:
    global _pending
    if _held:
        return None  # an outer held() section decides
    signum, _pending = _pending, None
    return signum


class shielded(AbstractContextManager):  # noqa: N801 - used as a with-statement helper
    """``with shielded(cm):`` is ``with cm:`` whose enter and exit are never cut short by a
    stop: a lock being taken is taken, and released again before the stop goes on; a lock
    being released is released."""

    def __init__(self, cm: AbstractContextManager) -> None:
        self.cm = cm

    def __enter__(self) -> Any:
        global _pending
        with held(raise_pending=False):
            value = self.cm.__enter__()
            signum, _pending = _pending, None  # a stop that came while entering
        if signum is not None:
            try:
                _stop(signum)
            except Stopped as stop:
                self.__exit__(Stopped, stop, None)  # leave again (the with body never runs)
                raise
        return value

    def __exit__(self, *exc: Any) -> bool | None:
        with held(raise_pending=exc[0] is None):
            return self.cm.__exit__(*exc)
