"""Fault isolation on an engine actor: whose fault a failure is, and what happens to the rows.

``palign.common.failures`` sorts failures; this module acts on them for one actor
(``palign.runtime.worker``):

- A row fault becomes a reject of kind ``row``; an exception our own stage code raises on one
  row's data is found by serving the batch's rows one by one, and rejects that row alone.
- A machinery fault (anything the engine raises, a grader that cannot restart) is written to the
  stage's attempt ledger with the rows in flight, and the actor's process exits: Ray restarts the
  actor and retries the batch. The retry sees which rows were in flight, checks the new engine's
  health, and serves those rows one by one; a row that was in flight for ``max_row_attempts``
  crashes is rejected with kind ``system``. An engine that fails its health check
  ``engine.max_failures`` times in a row fails the stage.
- A batch that had rows in flight when the actor died is served alone (the other batches in
  flight wait: :class:`Gate`), so a second crash names its one row, not whatever else was in
  flight.

The ledger (``palign.runtime.attempts``) outlives the actor: a Ray actor of its own on the driver's
node, or an ``AttemptLedger`` in this process when the worker runs outside Ray (tests), where
there is no actor to restart and a machinery fault is raised instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from palign.common.failures import SYSTEM, MachineryError, StageFailed, describe, is_machinery
from palign.common.logs import FILE_ONLY
from palign.engines.guard import GuardedEngine
from palign.runtime.attempts import AttemptLedger
from palign.stages.base import Outcome, Row, rejected

log = logging.getLogger(__name__)

MACHINERY_EXIT_CODE = 75  # the actor's exit status after a machinery fault (Ray restarts it)


class FaultIsolation:
    """One actor's side of the attempt ledger: serves a batch under the :class:`Gate`, records
    the rows in flight, finds the row at fault, and ends the actor on a machinery fault.

    ``process`` is the stage's own work on some rows (the worker's); ``engine`` the actor's
    engine (None: the stage runs none here); ``ledger`` the stage's attempt ledger (a Ray actor
    handle of ``AttemptLedger``, or one in this process); ``actor`` this actor's id
    (:func:`actor_id`)."""

    def __init__(self, stage: str, ledger: Any, actor: str, max_failures: int,
                 engine: GuardedEngine | None,
                 process: Callable[[list[Row]], list[Outcome]]) -> None:
        self.stage = stage
        self.ledger = ledger
        self.actor = actor
        self.max_failures = max_failures  # engine.max_failures
        self.engine = engine
        self.process = process
        self.gate = Gate()

    def serve(self, rows: list[Row]) -> list[Outcome]:
        """The batch's outcomes; after a crash with these rows in flight, row by row."""
        ids = [str(r["id"]) for r in rows]
        crashes = self.call("crashed", ids)
        if not crashes:
            with self.gate.shared():
                return self._attempt(rows)
        with self.gate.exclusive():
            return self._serve_suspects(rows, crashes)

    def _serve_suspects(self, rows: list[Row], crashes: dict[str, int]) -> list[Outcome]:
        ids = [str(r["id"]) for r in rows]
        log.warning("%s: %d of %d rows were in flight when an earlier attempt died; checking "
                    "the engine, then serving them one by one", self.stage, len(crashes),
                    len(rows))
        self._check_engine()
        by_id: dict[str, Outcome] = {}
        # The likeliest culprits last: the others finish before it can crash the actor again.
        for row in sorted(rows, key=lambda r: crashes.get(str(r["id"]), 0)):
            row_id = str(row["id"])
            if self.call("exhausted", row_id):
                reason = (f"{self.stage}: the engine failed {crashes[row_id]} times while "
                          f"serving this row (last: {self.call('reason', row_id)})")
                log.error("%s: rejecting row %s: %s", self.stage, row_id, reason)
                by_id[row_id] = rejected(row, reason, SYSTEM)
                self.call("end", [row_id])
                continue
            (by_id[row_id],) = self._attempt([row])
        return [by_id[i] for i in ids]

    def _attempt(self, rows: list[Row]) -> list[Outcome]:
        ids = [str(r["id"]) for r in rows]
        self.call("begin", ids, self.actor)
        # a line per batch: the actor's log file only (Ray would forward each to the driver)
        log.info("%s: %d row(s) in flight: %s", self.stage, len(ids),
                 ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}", extra=FILE_ONLY)
        try:
            result = self._isolating(rows)
        except MachineryError as err:
            self.call("note", ids, describe(err))
            self.exit(f"{self.stage}: machinery failure with {len(ids)} row(s) in flight: "
                      f"{describe(err)}")
        self.call("end", ids, self.actor)
        return result

    def _isolating(self, rows: list[Row]) -> list[Outcome]:
        """Process the rows together; if our own code raises on them (not the machinery),
        process them one by one and reject the row that raises, with the exception."""
        try:
            return self.process(rows)
        except MachineryError:
            raise
        except Exception as err:  # noqa: BLE001 - find the row at fault
            if is_machinery(err):  # out of memory, a device error: not any row's doing
                raise MachineryError(describe(err)) from err
            if len(rows) == 1:
                log.warning("%s: row %s raised", self.stage, rows[0].get("id"), exc_info=True)
                return [rejected(rows[0], f"{self.stage} failed on this row: {describe(err)}")]
            log.warning("%s: a batch of %d rows raised; serving them one by one", self.stage,
                        len(rows), exc_info=True)
        outcomes: list[Outcome] = []
        for row in rows:
            try:
                one = self.process([row])
            except MachineryError:
                raise
            except Exception as err:  # noqa: BLE001 - this row's own fault
                if is_machinery(err):
                    raise MachineryError(describe(err)) from err
                one = [rejected(row, f"{self.stage} failed on this row: {describe(err)}")]
            outcomes += one
        return outcomes

    def _check_engine(self) -> None:
        """After a crash: is this actor's (new) engine sound? If not, it is the machinery's
        fault, not the rows': exit again, or fail the stage once that has happened too often."""
        if self.engine is None:
            return
        try:
            self.engine.health_check()
        except MachineryError as err:
            reason = describe(err)
            if self.call("engine_failed", self.actor, reason):
                raise StageFailed(
                    f"{self.stage}: the engine failed its health check "
                    f"{self.max_failures} times in a row on actor {self.actor} "
                    f"(engine.max_failures); last error: {reason}") from err
            self.exit(f"{self.stage}: the engine failed its health check: {reason}")

    def call(self, method: str, *args: Any) -> Any:
        """Call the attempt ledger's ``method``, wherever the ledger lives."""
        if isinstance(self.ledger, AttemptLedger):
            return getattr(self.ledger, method)(*args)
        import ray

        return ray.get(getattr(self.ledger, method).remote(*args))

    def exit(self, message: str) -> None:
        """End this actor's process so that Ray restarts it (fresh engine, fresh device state)
        and retries the batch. Outside a Ray actor there is nothing to restart: raise."""
        if self.actor == "local":
            raise MachineryError(message)
        log.error("%s; exiting this actor so that Ray restarts it and retries the batch",
                  message)
        logging.shutdown()
        os._exit(MACHINERY_EXIT_CODE)


class Gate:
    """Batches run side by side (``shared``); a batch whose rows were in flight when the actor
    died runs alone (``exclusive``), so that a crash it causes again implicates only its row
    in flight. Waiting exclusive batches go first."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive or self._waiting:
                self._cv.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cv.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


def actor_id() -> str:
    """This Ray actor's id (kept across restarts), or "local" outside an actor."""
    try:
        import ray

        if ray.is_initialized():
            actor = ray.get_runtime_context().get_actor_id()
            if actor:
                return actor
    except Exception:  # noqa: BLE001 - no Ray here
        pass
    return "local"
