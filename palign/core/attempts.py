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
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROCESS_DIED = "its process died (killed, or crashed without a Python error)"


@dataclass
class AttemptLedger:
    max_row_attempts: int = 3  # crashes with a row in flight before it is rejected
    max_engine_failures: int = 3  # consecutive failed health checks of one actor
    open: dict[str, str] = field(default_factory=dict)  # id in flight -> reason noted ("")
    crashes: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    engine_failures: dict[str, int] = field(default_factory=dict)  # actor -> consecutive

    def crashed(self, ids: list[str]) -> dict[str, int]:
        """Close ids left open by an attempt that died, counting one crash each; returns the
        crash count of every id of ``ids`` that has crashed (ids never crashed are absent)."""
        for i in ids:
            if i in self.open:
                reason = self.open.pop(i)
                self.crashes[i] = self.crashes.get(i, 0) + 1
                self.last_error[i] = reason or PROCESS_DIED
        return {i: self.crashes[i] for i in ids if i in self.crashes}

    def begin(self, ids: list[str]) -> None:
        for i in ids:
            self.open[i] = ""

    def note(self, ids: list[str], reason: str) -> None:
        """Why the attempt holding ``ids`` is about to die (kept with the crash)."""
        for i in ids:
            if i in self.open:
                self.open[i] = reason

    def end(self, ids: list[str], actor: str | None = None) -> None:
        """The attempt finished: its rows are done, and its actor's engine is sound."""
        for i in ids:
            self.open.pop(i, None)
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

    def size(self) -> int:
        return len(self.open) + len(self.crashes)
