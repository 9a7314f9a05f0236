"""Engine actors that hang where they cannot time themselves out are killed from outside.

A hung engine call inside a running actor raises at ``engine.request_timeout_s``
(``palign.engines.guard``) and the actor ends itself. A process that does not run at all (a
SIGSTOPped or frozen process, a thread that holds the interpreter's lock for ever) cannot; Ray
does not notice either, and its batches would hang the stage for ever while the run's lock
heartbeat goes on. So every stage actor gives the stage's attempt ledger
(``palign.runtime.attempts``) a sign of life every few seconds (:func:`give_signs_of_life`), and a
thread of the driver (:class:`Watchdog`) asks the ledger for actors silent past the limit and
kills each with ``ray.kill(handle, no_restart=False)``: Ray ends the process (SIGKILL, which a
stopped process obeys too), restarts the actor and retries its batches, and the ledger counts
the rows it held in flight as a crash, so a row that hangs every engine that serves it becomes a
``system`` reject after ``max_row_attempts``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from palign.runtime.attempts import AttemptLedger

log = logging.getLogger(__name__)


def interval(limit_s: float) -> float:
    """How often signs of life are given and looked for: several times within the limit."""
    return max(0.1, min(5.0, limit_s / 5))


def give_signs_of_life(ledger: Any, actor: str, limit_s: float) -> None:
    """From a Ray actor: have the ledger watch this actor, then tell it every few seconds that
    the process still runs (a daemon thread, for the process's life). An in-process ledger
    (no Ray actor) has nothing to watch."""
    import ray

    if isinstance(ledger, AttemptLedger):
        return
    me = ray.get_runtime_context().current_actor  # a weak handle: it keeps nothing alive
    ray.get(ledger.watch.remote(actor, me))
    every = interval(limit_s)

    def beat() -> None:
        while True:
            time.sleep(every)
            try:
                ledger.alive.remote(actor, me)  # the handle: for a ledger that restarted
            except Exception:  # noqa: BLE001 - the ledger restarting; the next one counts
                log.debug("a sign of life did not reach the ledger", exc_info=True)

    threading.Thread(target=beat, name="palign-signs-of-life", daemon=True).start()


class Watchdog:
    """The driver's side, for one stage (a context manager): every few seconds, kill the
    actors the ledger found silent for over ``limit_s``."""

    def __init__(self, stage: str, ledger: Any, limit_s: float) -> None:
        self.stage = stage
        self.ledger = ledger
        self.limit_s = limit_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"palign-watchdog-{stage}",
                                        daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        every = interval(self.limit_s)
        while not self._stop.wait(every):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the ledger restarting; look again next time
                log.debug("%s: the watchdog could not reach the ledger", self.stage,
                          exc_info=True)

    def check(self) -> int:
        """Kill the actors silent past the limit; how many were killed."""
        import ray

        silent = ray.get(self.ledger.silent.remote(self.limit_s), timeout=60)
        for actor, handle, rows in silent:
            # Without rows it may be an actor Ray Data has let go (dead already: killing it
            # again does nothing), or one frozen while idle.
            (log.warning if rows else log.debug)(
                "%s: engine actor %s gave no sign of life for over %g s "
                "(engine.request_timeout_s) with %d row(s) in flight: killing it so that Ray "
                "restarts it and retries its batches", self.stage, actor[:12], self.limit_s,
                rows)
            try:
                ray.kill(handle, no_restart=False)
            except Exception:  # noqa: BLE001 - gone already (its job, its session): nothing to do
                log.debug("%s: could not kill actor %s", self.stage, actor, exc_info=True)
        return len(silent)
