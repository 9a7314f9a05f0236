"""The attempt ledger: which rows were in flight when an actor died, and how often.

When an engine actor dies (its process killed, an engine that raised, a CUDA error), Ray restarts
it and retries the batch it held. Nothing inside the dead process survives, so the actors keep
this ledger outside themselves (one Ray actor per stage run, see ``palign.runtime.worker``); this
module is its logic, plain Python.

Protocol, per batch: ``crashed(ids)`` first (an id still open from an earlier attempt means that
attempt died with it in flight: one crash for it), then ``begin(ids)`` ... ``end(ids)`` around the
work. A worker that sees a machinery failure calls ``note(ids, reason)`` before it exits, so the
crash keeps its reason. The ledger only ever holds the rows in flight and the rows that crashed
and have not finished since: its size does not grow with the stage.

Engine health is tracked per actor: ``engine_failed(actor, reason)`` counts consecutive failed
health checks of one actor (reset by ``end`` of any batch on it), so one broken GPU fails the
stage loudly instead of turning every row it touches into rejects.

Liveness: each actor hands the ledger a handle to itself (``watch``) and then a sign of life
every few seconds (``alive``); ``begin(ids, actor)`` says which actor holds which rows. An actor
that cannot time itself out (a SIGSTOPped or frozen process) stops giving signs of life:
``silent(limit_s)`` names it, with its rows in flight noted as timed out, for the stage's
watchdog to kill (Ray restarts it and retries its batches, and ``crashed`` then counts those
rows as for any crash). A handle is the actor's own (a weak reference in Ray): holding it does
not keep alive an actor that Ray Data lets go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROCESS_DIED = "its process died (killed, or crashed without a Python error)"


@dataclass
class AttemptLedger:
    max_row_attempts: int = 3  # crashes with a row in flight before it is rejected
    max_engine_failures: int = 3  # consecutive failed health checks of one actor
    open: dict[str, str] = field(default_factory=dict)  # id in flight -> reason noted ("")
    crashes: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    engine_failures: dict[str, int] = field(default_factory=dict)  # actor -> consecutive
    holder: dict[str, str] = field(default_factory=dict)  # id in flight -> its actor
    handles: dict[str, Any] = field(default_factory=dict)  # actor watched -> its handle
    seen: dict[str, float] = field(default_factory=dict)  # actor watched -> its last sign
    clock: Callable[[], float] = time.monotonic

    def crashed(self, ids: list[str]) -> dict[str, int]:
        """Close ids left open by an attempt that died, counting one crash each; returns the
        crash count of every id of ``ids`` that has crashed (ids never crashed are absent)."""
        for i in ids:
            self.holder.pop(i, None)
            if i in self.open:
                reason = self.open.pop(i)
                self.crashes[i] = self.crashes.get(i, 0) + 1
                self.last_error[i] = reason or PROCESS_DIED
        return {i: self.crashes[i] for i in ids if i in self.crashes}

    def begin(self, ids: list[str], actor: str | None = None) -> None:
        for i in ids:
            self.open[i] = ""
            if actor is not None:
                self.holder[i] = actor

    def note(self, ids: list[str], reason: str) -> None:
        """Why the attempt holding ``ids`` is about to die (kept with the crash)."""
        for i in ids:
            if i in self.open:
                self.open[i] = reason

    def end(self, ids: list[str], actor: str | None = None) -> None:
        """The attempt finished: its rows are done, and its actor's engine is sound."""
        for i in ids:
            self.open.pop(i, None)
            self.holder.pop(i, None)
            self.crashes.pop(i, None)
            self.last_error.pop(i, None)
        if actor is not None:
            self.engine_failures.pop(actor, None)

    def reason(self, row_id: str) -> str:
        """What the last crash with this row in flight was."""
        return self.last_error.get(row_id, PROCESS_DIED)

    def exhausted(self, row_id: str) -> bool:
        return self.crashes.get(row_id, 0) >= self.max_row_attempts

    def engine_failed(self, actor: str, reason: str) -> bool:
        """Count a failed health check of ``actor``'s engine; True when it is one too many."""
        self.engine_failures[actor] = self.engine_failures.get(actor, 0) + 1
        self.last_error[f"engine:{actor}"] = reason
        return self.engine_failures[actor] >= self.max_engine_failures

    def watch(self, actor: str, handle: Any) -> None:
        """Watch ``actor`` (again, after a restart) for signs of life; ``handle`` kills it."""
        self.handles[actor] = handle
        self.seen[actor] = self.clock()

    def alive(self, actor: str, handle: Any = None) -> None:
        """A sign of life; with a handle, it also watches an actor this ledger does not know
        (this ledger restarted and forgot it)."""
        if actor in self.seen:
            self.seen[actor] = self.clock()
        elif handle is not None:
            self.watch(actor, handle)

    def silent(self, limit_s: float) -> list[tuple[str, Any, int]]:
        """The watched actors with no sign of life for over ``limit_s``: (actor, handle, rows
        it holds in flight) each. They are no longer watched (a restart watches them again),
        and the reason is noted on their rows in flight."""
        now = self.clock()
        found = []
        for actor in [a for a, t in self.seen.items() if now - t > limit_s]:
            quiet = now - self.seen.pop(actor)
            held = [i for i, a in self.holder.items() if a == actor]
            self.note(held, f"its engine actor gave no sign of life for {quiet:.0f} s, over "
                            f"engine.request_timeout_s={limit_s:g} s (hung or stopped), and "
                            "was killed")
            found.append((actor, self.handles.pop(actor), len(held)))
        return found

    def size(self) -> int:
        return len(self.open) + len(self.crashes)
