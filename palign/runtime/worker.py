"""The Ray Data callable every stage runs on its actor pool: one engine per actor, built once.

Rows travel as JSON text in a ``record`` column: stage records are nested and vary from row to
row (a reject carries the raw input), which Arrow schemas handle badly. The worker writes its
batch's results itself, where the run's output lives (``palign.core.shards``: a shard named after
the stage's run token and the batch's ids, rejects first, the output's index last as the
batch's commit); only counts go back to the driver. A batch whose commit is already there (Ray
retried a task whose write had finished) is not served again.

Failures (``palign.core.failures``):

- The engine and the grading worker are started in the constructor: a model that does not load
  or a grader that cannot start fails the actor's start, which Ray Data retries
  (``engine.max_failures`` times) and then fails the stage with that error.
- A row fault becomes a reject of kind ``row``; an exception our own stage code raises on one
  row's data is found by serving the batch's rows one by one, and rejects that row alone.
- A machinery fault (anything the engine raises, a grader that cannot restart) is written to the
  stage's attempt ledger with the rows in flight, and the actor's process exits: Ray restarts the
  actor and retries the batch. The retry sees which rows were in flight, checks the new engine's
  health, and serves those rows one by one; a row that was in flight for ``max_row_attempts``
  crashes is rejected with kind ``system``. An engine that fails its health check
  ``engine.max_failures`` times in a row fails the stage.
- Storage tries every call again on transient faults (``palign.core.retrying``). A batch whose
  write still fails is retried the same way (the actor exits once no batch of it is at the
  engine, so no row counts a crash), ``engine.max_failures`` times in a row at most, then the
  stage fails naming the folder; never a reject. A full disk fails the stage at once.

Batches in flight: Ray Data hands a replica ``ceil(engine.max_in_flight / engine.batch_size)``
batches at a time (one thread each); they share the actor's engine through an
``EngineServer`` (``palign.engines.server``), so one batch's slowest row never idles the engine.
A batch that had rows in flight when the actor died is served alone (the others wait), so a
second crash names its one row, not whatever else was in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from palign.core import storage
from palign.core.attempts import AttemptLedger
from palign.core.config import Config, EngineConfig
from palign.core.failures import (
    SYSTEM,
    MachineryError,
    StageFailed,
    StorageUnavailable,
    describe,
    is_machinery,
)
from palign.core.logs import FILE_ONLY, setup_actor_logging
from palign.core.shards import (
    INDEX,
    REJECTS,
    batch_stem,
    data_name,
    is_committed,
    new_token,
    read_committed_ids,
    reject_columns,
    reject_row,
    write_shard,
)
from palign.engines.base import EngineSpec
from palign.engines.guard import GuardedEngine
from palign.runtime import telemetry
from palign.runtime.watchdog import give_signs_of_life
from palign.stages.outcome import Outcome, rejected
from palign.stages.registry import REGISTRY

log = logging.getLogger(__name__)

MACHINERY_EXIT_CODE = 75  # the actor's exit status after a machinery fault (Ray restarts it)


def engine_spec(engine: EngineConfig, model_path: str, seed: int = 0,
                stage: str = "engine", template_kwargs: dict[str, Any] | None = None
                ) -> EngineSpec:
    from palign.runtime.resources import engine_request

    return EngineSpec(
        model=model_path,
        backend=engine.backend,
        dtype=engine.dtype,
        max_model_len=engine.max_model_len,
        tensor_parallel_size=engine.tensor_parallel_size,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        enforce_eager=engine.enforce_eager,
        cpu_kv_cache_gib=engine.cpu_kv_cache_gib,
        max_num_seqs=engine.max_num_seqs,
        seed=seed,
        # The pool's plan says how a replica runs its ranks ("ray" inside its placement group)
        executor_backend=engine_request(stage, engine).executor_backend,
        engine_kwargs=dict(engine.engine_kwargs),
        vllm_driver=engine.vllm_driver,
        chat_template_kwargs=dict(template_kwargs or {}),
    )



def actor_log_dir() -> Path:
    """The Ray session's log folder when this process belongs to a Ray session, else a
    temporary folder."""
    try:
        import ray

        node = ray._private.worker._global_node  # the session this worker belongs to
        if node is not None:
            return Path(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - not in a Ray session
        pass
    return Path(tempfile.gettempdir())

class StageWorker:
    """``map_batches`` callable: batch of ``{"id", "record"}`` in, outcomes out.

    ``model`` is the model the engine serves (None: this stage needs no engine here);
    ``ledger`` is the stage's attempt ledger (a Ray actor handle of ``LedgerActor``, or an
    ``AttemptLedger`` when run in-process)."""

    def __init__(self, cfg_raw: dict[str, Any], stage: str, model: str | None = None,
                 ledger: Any = None, token: str | None = None) -> None:
        setup_actor_logging(stage, actor_log_dir())
        self.cfg = Config.model_validate(cfg_raw)
        self.stage = stage
        self.definition = REGISTRY[stage]
        self.section = self.definition.section(self.cfg)
        self.model = model
        self.out_dir = self.cfg.stage_dir(stage)
        self.token = token or new_token()  # the stage run's; shard names derive from it
        self.ledger = ledger if ledger is not None else AttemptLedger(
            self.section.max_row_attempts, self.section.engine.max_failures)
        self.actor = _actor_id()
        if self.actor != "local":  # from now on, a frozen process is killed from outside
            give_signs_of_life(self.ledger, self.actor, self.section.engine.request_timeout_s)
        self.gate = _Gate()
        self._reported = {"prompt_tokens": 0, "cached_tokens": 0}
        self._report_lock = threading.Lock()
        self.engine: GuardedEngine | None = self._start_engine() if model else None
        self.grader: Any = self._start_grader() if self.definition.grades else None

    def _start_engine(self) -> GuardedEngine:
        from palign.engines import build_engine
        from palign.engines.models import resolve_model
        from palign.engines.server import EngineServer

        path = resolve_model(self.model, self.cfg.models.cache_dir)
        engine = build_engine(engine_spec(self.section.engine, path, self.cfg.run.seed,
                                          self.stage, self.cfg.template_kwargs_for(self.model)))
        log.info("%s: engine %s ready for %s", self.stage, engine.name, self.model)
        return GuardedEngine(EngineServer(engine, self.section.engine.max_in_flight),
                             self.section.engine.request_timeout_s)

    def _start_grader(self) -> Any:
        from palign.core.grading import Grader

        grader = Grader(timeout_s=self.section.grade_timeout_s)
        grader.start()  # GraderUnavailable: the actor does not start
        return grader

    # -- one batch ------------------------------------------------------------------------

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [json.loads(r) for r in batch["record"]]
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(self.definition.subfolder(row), []).append(row)
        stems = {sub: batch_stem(self.token, [str(r["id"]) for r in group])
                 for sub, group in groups.items()}
        if all(is_committed(self._folder(sub), stems[sub], self.cfg.output.format)
               for sub in groups):
            log.info("%s: a batch of %d rows was written by an earlier attempt", self.stage,
                     len(rows))
            return self._committed_counts(stems, len(rows))
        start = time.monotonic()
        outcomes = self._serve(rows)
        records = [o.record for o in outcomes if o.ok]
        metrics = self.definition.metrics(records)
        telemetry.stage_batch(self.stage, rows_in=len(rows), rows_out=len(records),
                              rejected=len(outcomes) - len(records),
                              seconds=time.monotonic() - start, tokens=metrics.tokens,
                              probes=metrics.probes, ratios=metrics.ratios,
                              prefill=metrics.prefill)
        engine = self._engine_report()
        by_id = {str(row["id"]): (row, o) for row, o in zip(rows, outcomes)}
        for sub, group in groups.items():
            good = [by_id[str(r["id"])][1].record for r in group if by_id[str(r["id"])][1].ok]
            bad = [reject_row(r["id"], self.stage, o.reason, r, o.kind)
                   for r in group if not (o := by_id[str(r["id"])][1]).ok]
            self._write(sub, stems[sub], good, bad)
        return {"rows": [len(rows)], "ok": [len(records)],
                "rejected": [len(rows) - len(records)], **engine}

    def _engine_report(self) -> dict[str, list[int]]:
        """The engine's prompt and cached tokens since the last report (batches in flight
        share one engine: each token is reported once) and its requests in flight (the most
        since the last report, and the most ever); recorded as metrics and returned to the
        driver for the stage's summary."""
        with self._report_lock:
            stats = self.engine.stats(window=True) if self.engine is not None else {}
            delta = {k: stats.get(k, 0) - self._reported[k] for k in self._reported}
            self._reported = {k: stats.get(k, 0) for k in self._reported}
        # The gauge shows the most requests in flight since the last report (a batch's end
        # alone would often catch a quiet moment).
        telemetry.engine_requests(self.stage, in_flight=stats.get("window_peak", 0),
                                  prompt_tokens=delta["prompt_tokens"],
                                  cached_tokens=delta["cached_tokens"])
        return {"prompt_tokens": [delta["prompt_tokens"]],
                "cached_tokens": [delta["cached_tokens"]],
                "peak_in_flight": [stats.get("peak_in_flight", 0)]}

    def _folder(self, sub: str) -> str:
        return storage.join(str(self.out_dir), sub) if sub else str(self.out_dir)

    def _write(self, sub: str, stem: str, good: list[dict[str, Any]],
               bad: list[dict[str, Any]]) -> None:
        """The rejects first, then the output with its index: the batch's commit. Storage
        tries each call again on transient faults; a write that fails through all of that
        is retried with the batch (``_storage_failed``). A full disk fails the stage."""
        folder = self._folder(sub)
        try:
            if bad:
                write_shard(storage.join(folder, REJECTS), stem, bad, "jsonl",
                            reject_columns(bad))
            else:
                storage.delete(storage.join(folder, REJECTS, INDEX,
                                            data_name(stem, "jsonl") + ".parquet"))
            write_shard(folder, stem, good, self.cfg.output.format,
                        self.definition.index_values(good))
        except StorageUnavailable as err:
            self._storage_failed(folder, err)
        if not getattr(self, "_wrote", False):  # this process's first commit: the store works
            self._wrote = True
            self._ledger("end", [], _storage_key(self.actor))

    def _storage_failed(self, folder: str, err: StorageUnavailable) -> None:
        """A batch whose write failed through storage's retries (``palign.core.retrying``,
        about 8 to 16 s of them per call): the machinery's fault, never the rows'. This actor
        exits, once no batch of it has rows at the engine (so none is counted as a crash),
        and Ray restarts it and retries the batch. Bounded: the ledger counts such failures
        per actor until one of its writes succeeds, and the ``engine.max_failures``-th fails
        the stage, naming the folder (a store down for good fails it within minutes)."""
        reason = describe(err)
        limit = self.section.engine.max_failures
        if self._ledger("engine_failed", _storage_key(self.actor), reason):
            raise StageFailed(
                f"{self.stage}: writing to {folder} failed {limit} times in a row on actor "
                f"{self.actor} (engine.max_failures), each after storage's own retries; last "
                f"error: {reason}. What was written is kept: run again once the store "
                "answers") from err
        with self.gate.exclusive():
            self._exit(f"{self.stage}: writing a batch to {folder} failed after storage's "
                       f"retries: {reason}")

    def _committed_counts(self, stems: dict[str, str], n: int) -> dict[str, list[Any]]:
        fmt = self.cfg.output.format
        ok = sum(len(read_committed_ids(self._folder(sub), data_name(stem, fmt)))
                 for sub, stem in stems.items())
        return {"rows": [n], "ok": [ok], "rejected": [n - ok],
                "prompt_tokens": [0], "cached_tokens": [0], "peak_in_flight": [0]}

    def _serve(self, rows: list[dict[str, Any]]) -> list[Outcome]:
        """The batch's outcomes; after a crash with these rows in flight, row by row."""
        ids = [str(r["id"]) for r in rows]
        crashes = self._ledger("crashed", ids)
        if not crashes:
            with self.gate.shared():
                return self._attempt(rows)
        with self.gate.exclusive():
            return self._serve_suspects(rows, crashes)

    def _serve_suspects(self, rows: list[dict[str, Any]],
                        crashes: dict[str, int]) -> list[Outcome]:
        ids = [str(r["id"]) for r in rows]
        log.warning("%s: %d of %d rows were in flight when an earlier attempt died; checking "
                    "the engine, then serving them one by one", self.stage, len(crashes),
                    len(rows))
        self._check_engine()
        by_id: dict[str, Outcome] = {}
        # The likeliest culprits last: the others finish before it can crash the actor again.
        for row in sorted(rows, key=lambda r: crashes.get(str(r["id"]), 0)):
            row_id = str(row["id"])
            if self._ledger("exhausted", row_id):
                reason = (f"{self.stage}: the engine failed {crashes[row_id]} times while "
                          f"serving this row (last: {self._ledger('reason', row_id)})")
                log.error("%s: rejecting row %s: %s", self.stage, row_id, reason)
                by_id[row_id] = rejected(row, reason, SYSTEM)
                self._ledger("end", [row_id])
                continue
            (by_id[row_id],) = self._attempt([row])
        return [by_id[i] for i in ids]

    def _attempt(self, rows: list[dict[str, Any]]) -> list[Outcome]:
        ids = [str(r["id"]) for r in rows]
        self._ledger("begin", ids, self.actor)
        # a line per batch: the actor's log file only (Ray would forward each to the driver)
        log.info("%s: %d row(s) in flight: %s", self.stage, len(ids),
                 ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}", extra=FILE_ONLY)
        try:
            result = self._isolating(rows)
        except MachineryError as err:
            self._ledger("note", ids, describe(err))
            self._exit(f"{self.stage}: machinery failure with {len(ids)} row(s) in flight: "
                       f"{describe(err)}")
        self._ledger("end", ids, self.actor)
        return result

    def _isolating(self, rows: list[dict[str, Any]]) -> list[Outcome]:
        """Process the rows together; if our own code raises on them (not the machinery),
        process them one by one and reject the row that raises, with the exception."""
        try:
            return self._process(rows)
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
                one = self._process([row])
            except MachineryError:
                raise
            except Exception as err:  # noqa: BLE001 - this row's own fault
                if is_machinery(err):
                    raise MachineryError(describe(err)) from err
                one = [rejected(row, f"{self.stage} failed on this row: {describe(err)}")]
            outcomes += one
        return outcomes

    def _process(self, rows: list[dict[str, Any]]) -> list[Outcome]:
        return self.definition.process(rows, self.engine, self.grader, self.section)

    # -- machinery ------------------------------------------------------------------------

    def _check_engine(self) -> None:
        """After a crash: is this actor's (new) engine sound? If not, it is the machinery's
        fault, not the rows': exit again, or fail the stage once that has happened too often."""
        if self.engine is None:
            return
        try:
            self.engine.health_check()
        except MachineryError as err:
            reason = describe(err)
            if self._ledger("engine_failed", self.actor, reason):
                raise StageFailed(
                    f"{self.stage}: the engine failed its health check "
                    f"{self.section.engine.max_failures} times in a row on actor {self.actor} "
                    f"(engine.max_failures); last error: {reason}") from err
            self._exit(f"{self.stage}: the engine failed its health check: {reason}")

    def _ledger(self, method: str, *args: Any) -> Any:
        if isinstance(self.ledger, AttemptLedger):
            return getattr(self.ledger, method)(*args)
        import ray

        return ray.get(getattr(self.ledger, method).remote(*args))

    def _exit(self, message: str) -> None:
        """End this actor's process so that Ray restarts it (fresh engine, fresh device state)
        and retries the batch. Outside a Ray actor there is nothing to restart: raise."""
        if self.actor == "local":
            raise MachineryError(message)
        log.error("%s; exiting this actor so that Ray restarts it and retries the batch",
                  message)
        logging.shutdown()
        os._exit(MACHINERY_EXIT_CODE)

    def __del__(self) -> None:
        grader = getattr(self, "grader", None)
        if grader is not None:
            grader.close()


class _Gate:
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


def _storage_key(actor: str) -> str:
    """The ledger's name for an actor's failed batch writes (counted as its engine's failed
    health checks are, apart from them)."""
    return f"storage:{actor}"


def _actor_id() -> str:
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
