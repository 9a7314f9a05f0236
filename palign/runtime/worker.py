"""The Ray Data callable every stage runs on its actor pool: one engine per actor, built once.

Rows travel as JSON text in a ``record`` column: stage records are nested and vary from row to
row (a reject carries the raw input), which Arrow schemas handle badly. An actor is told its
stage's section and the few run settings it reads (``palign.runtime.spec.WorkerSpec``), never
the whole config. Its parts, one job each:

- ``StageWorker`` (here): serves a batch: groups its rows by subfolder, asks the stage to
  process them, hands the outcomes to the commit, and returns only counts to the driver (with
  the engine's tokens, the tokens the records account for and how long the actor took to
  start: the stage's ``_SUMMARY.json`` keeps them).
- ``palign.runtime.commit``: writes the batch's shards and rejects where the run's output lives;
  a batch an earlier attempt committed is not served again; a store that keeps failing.
- ``palign.runtime.isolation``: whose fault a failure is: a row's (a reject) or the machinery's
  (the attempt ledger, the actor's exit, the rows in flight served one by one on the retry).
- ``palign.runtime.telemetry.EngineReport``: the engine's tokens and requests in flight.

The engine and the grading worker are started in the constructor: a model that does not load
or a grader that cannot start fails the actor's start, which Ray Data retries
(``engine.max_failures`` times) and then fails the stage with that error.

Batches in flight: Ray Data hands a replica ``ceil(engine.max_in_flight / engine.batch_size)``
batches at a time (one thread each); they share the actor's engine through an
``EngineServer`` (``palign.engines.server``), so one batch's slowest row never idles the engine.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from palign.common.logs import setup_actor_logging
from palign.data.shards import reject_row
from palign.engines.base import EngineSpec
from palign.engines.guard import GuardedEngine
from palign.runtime import telemetry
from palign.runtime.attempts import AttemptLedger
from palign.runtime.commit import Commit
from palign.runtime.environment import actor_log_dir
from palign.runtime.isolation import FaultIsolation, actor_id
from palign.runtime.spec import WorkerSpec
from palign.runtime.watchdog import give_signs_of_life
from palign.stages.base import Context, Outcome, Row

log = logging.getLogger(__name__)


class StageWorker:
    """``map_batches`` callable: batch of ``{"id", "record"}`` in, counts out.

    ``spec`` says what the actor runs (its stage, section, output and model: None there, this
    stage needs no engine here); ``ledger`` is the stage's attempt ledger (a Ray actor handle
    of ``AttemptLedger``; None: one in this process, for a worker run outside Ray)."""

    def __init__(self, spec: WorkerSpec, ledger: Any = None) -> None:
        started = time.monotonic()
        setup_actor_logging(spec.stage, actor_log_dir())
        self.spec = spec
        self.stage = spec.stage
        self.definition = spec.definition()
        self.section = spec.validated_section()
        self.model = spec.model
        self.out_dir = spec.out_dir
        self.ledger = ledger if ledger is not None else AttemptLedger(
            self.section.max_row_attempts, self.section.engine.max_failures)
        self.actor = actor_id()
        if self.actor != "local":  # from now on, a frozen process is killed from outside
            give_signs_of_life(self.ledger, self.actor, self.section.engine.request_timeout_s)
        self.engine: GuardedEngine | None = self._start_engine() if self.model else None
        needs_grader = self.definition.needs_grader(self.section)
        self.grader: Any = self._start_grader() if needs_grader else None
        self.isolation = FaultIsolation(self.stage, self.ledger, self.actor,
                                        self.section.engine.max_failures, self.engine,
                                        self._process)
        self.commit = Commit(self.stage, self.definition, self.out_dir, spec.output_format,
                             spec.token, self.isolation)
        self.report = telemetry.EngineReport(self.stage, self.engine)
        # This replica's fixed cost (its engine loaded, its grader started): returned with
        # every batch's counts, so the driver's summary knows it apart from the rows' time.
        self.init_s = time.monotonic() - started

    def _start_engine(self) -> GuardedEngine:
        from palign.engines import build_engine
        from palign.engines.models import resolve_model
        from palign.engines.server import EngineServer

        assert self.model is not None
        config = self.section.engine
        # a remote engine's model is the name its server knows, nothing to load here
        path = self.model if config.is_remote() else resolve_model(self.model,
                                                                   self.spec.cache_dir)
        engine = build_engine(EngineSpec.of(
            config, path, seed=self.spec.seed, executor_backend=self.spec.executor_backend,
            template_kwargs=self.spec.template_kwargs))
        log.info("%s: engine %s ready for %s", self.stage, engine.name, self.model)
        # a remote engine's call may wait out its retries: the guard's limit covers them all
        return GuardedEngine(EngineServer(engine, config.in_flight_per_replica()),
                             config.call_limit_s())

    def _start_grader(self) -> Any:
        from palign.method.grading import Grader

        grader = Grader(timeout_s=self.definition.grade_timeout(self.section))
        grader.start()  # GraderUnavailable: the actor does not start
        return grader

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [json.loads(r) for r in batch["record"]]
        groups: dict[str, list[Row]] = {}
        for row in rows:
            groups.setdefault(self.definition.subfolder(row), []).append(row)
        stems = self.commit.stems(groups)
        if self.commit.is_done(stems):
            log.info("%s: a batch of %d rows was written by an earlier attempt", self.stage,
                     len(rows))
            counts = self.commit.committed_counts(stems, len(rows))
            return {**counts, "init_s": [self.init_s], "work_tokens": [0]}
        start = time.monotonic()
        outcomes = self.isolation.serve(rows)
        records = [o.record for o in outcomes if o.ok]
        metrics = self.definition.metrics(records)
        telemetry.stage_batch(self.stage, rows_in=len(rows), rows_out=len(records),
                              rejected=len(outcomes) - len(records),
                              seconds=time.monotonic() - start, tokens=metrics.tokens,
                              probes=metrics.probes, ratios=metrics.ratios,
                              prefill=metrics.prefill)
        engine = self.report()
        by_id = {str(row["id"]): (row, o) for row, o in zip(rows, outcomes)}
        for sub, group in groups.items():
            good = [by_id[str(r["id"])][1].record for r in group if by_id[str(r["id"])][1].ok]
            bad = [reject_row(r["id"], self.stage, o.reason, r, o.kind)
                   for r in group if not (o := by_id[str(r["id"])][1]).ok]
            self.commit.write(sub, stems[sub], good, bad)
        return {"rows": [len(rows)], "ok": [len(records)],
                "rejected": [len(rows) - len(records)], **engine,
                "init_s": [self.init_s], "work_tokens": [metrics.tokens]}

    def _process(self, rows: list[Row]) -> list[Outcome]:
        """The stage's own work on some of the batch's rows (``FaultIsolation`` calls it)."""
        return self.definition.process(rows, Context(self.engine, self.grader, self.section))

    def __del__(self) -> None:
        grader = getattr(self, "grader", None)
        if grader is not None:
            grader.close()
