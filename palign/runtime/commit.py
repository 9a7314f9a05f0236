"""An engine actor's writes: a batch's results committed where the run's output lives.

The worker writes its batch's results itself (``palign.data.shards``): per subfolder, a shard
named after the stage's run token and the batch's ids, rejects first, the output's index last
as the batch's commit; only counts go back to the driver. A batch whose commit is already there
(Ray retried a task whose write had finished) is not served again: its counts are read back.

Storage tries every call again on transient faults (``palign.data.retrying``). A batch whose
write still fails is retried the same way as a machinery fault (the actor exits once no batch of
it is at the engine, so no row counts a crash), ``engine.max_failures`` times in a row at most,
then the stage fails naming the folder; never a reject. A full disk fails the stage at once.
"""

from __future__ import annotations

from typing import Any

from palign.common.failures import StageFailed, StorageUnavailable, describe
from palign.data import storage
from palign.data.layout import INDEX, REJECTS, batch_stem, data_name, is_committed
from palign.data.shards import read_committed_ids, reject_columns, write_shard
from palign.runtime.isolation import FaultIsolation
from palign.runtime.telemetry import ADDITIVE
from palign.stages.base import Row, Stage


class Commit:
    """The shards of one run (``token``) of ``stage`` under ``out_dir``, in ``output_format``,
    their index columns from ``definition``; a write that fails through storage's retries goes
    through the actor's ``isolation`` (its ledger, its gate, its exit)."""

    def __init__(self, stage: str, definition: Stage, out_dir: str, output_format: str,
                 token: str, isolation: FaultIsolation) -> None:
        self.stage = stage
        self.definition = definition
        self.out_dir = out_dir
        self.format = output_format
        self.token = token
        self.isolation = isolation
        self._wrote = False  # this process has committed a batch: the store works

    def folder(self, sub: str) -> str:
        return storage.join(str(self.out_dir), sub) if sub else str(self.out_dir)

    def stems(self, groups: dict[str, list[Row]]) -> dict[str, str]:
        """Each subfolder's shard name for its rows of the batch."""
        return {sub: batch_stem(self.token, [str(r["id"]) for r in group])
                for sub, group in groups.items()}

    def is_done(self, stems: dict[str, str]) -> bool:
        """Whether an earlier attempt committed every part of the batch."""
        return all(is_committed(self.folder(sub), stem, self.format)
                   for sub, stem in stems.items())

    def write(self, sub: str, stem: str, good: list[dict[str, Any]],
              bad: list[dict[str, Any]]) -> None:
        """The rejects first, then the output with its index: the batch's commit. Storage
        tries each call again on transient faults; a write that fails through all of that
        is retried with the batch (``_storage_failed``). A full disk fails the stage."""
        folder = self.folder(sub)
        try:
            if bad:
                write_shard(storage.join(folder, REJECTS), stem, bad, "jsonl",
                            reject_columns(bad))
            else:
                storage.delete(storage.join(folder, REJECTS, INDEX,
                                            data_name(stem, "jsonl") + ".parquet"))
            write_shard(folder, stem, good, self.format, self.definition.index_values(good))
        except StorageUnavailable as err:
            self._storage_failed(folder, err)
        if not self._wrote:  # this process's first commit: the store works
            self._wrote = True
            self.isolation.call("end", [], storage_key(self.isolation.actor))

    def _storage_failed(self, folder: str, err: StorageUnavailable) -> None:
        """A batch whose write failed through storage's retries (``palign.data.retrying``,
        about 8 to 16 s of them per call): the machinery's fault, never the rows'. This actor
        exits, once no batch of it has rows at the engine (so none is counted as a crash),
        and Ray restarts it and retries the batch. Bounded: the ledger counts such failures
        per actor until one of its writes succeeds, and the ``engine.max_failures``-th fails
        the stage, naming the folder (a store down for good fails it within minutes)."""
        isolation = self.isolation
        reason = describe(err)
        if isolation.call("engine_failed", storage_key(isolation.actor), reason):
            raise StageFailed(
                f"{self.stage}: writing to {folder} failed {isolation.max_failures} times "
                f"in a row on actor {isolation.actor} (engine.max_failures), each after "
                f"storage's own retries; last error: {reason}. What was written is kept: run "
                "again once the store answers") from err
        with isolation.gate.exclusive():
            isolation.exit(f"{self.stage}: writing a batch to {folder} failed after "
                           f"storage's retries: {reason}")

    def committed_counts(self, stems: dict[str, str], n: int) -> dict[str, list[Any]]:
        """The counts of a batch an earlier attempt committed (nothing new from the engine)."""
        ok = sum(len(read_committed_ids(self.folder(sub), data_name(stem, self.format)))
                 for sub, stem in stems.items())
        return {"rows": [n], "ok": [ok], "rejected": [n - ok],
                **{key: [0] for key in ADDITIVE}, "peak_in_flight": [0]}


def storage_key(actor: str) -> str:
    """The ledger's name for an actor's failed batch writes (counted as its engine's failed
    health checks are, apart from them)."""
    return f"storage:{actor}"
