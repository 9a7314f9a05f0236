"""The Ray Data callable every stage runs on its actor pool: one engine per actor, built once.

Rows travel as JSON text in a ``record`` column: stage records are nested and vary from row to
row (a reject carries the raw input), which Arrow schemas handle badly. The actor never lets a
bad row fail its batch: if a batch raises, its rows are retried one by one and the row that
still fails goes to rejects with the exception.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from palign import telemetry
from palign.config import Config, EngineConfig
from palign.engines.base import Engine, EngineSpec
from palign.stages.io import reject_row
from palign.stages.outcome import Outcome, rejected

log = logging.getLogger(__name__)


def engine_spec(engine: EngineConfig, model_path: str, seed: int = 0,
                stage: str = "engine") -> EngineSpec:
    from palign.resources import engine_request

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
    )


def stage_model(cfg: Config, stage: str) -> str | None:
    """The model a stage's engine serves: teacher, judge (the student by default), student.
    The evaluate stage serves each model under test in turn, so it names none here."""
    return {"generate": cfg.models.teacher, "truncate": cfg.judge_model,
            "align": cfg.models.student, "evaluate": None}[stage]


def stage_needs_engine(cfg: Config, stage: str) -> bool:
    if stage == "truncate":
        return cfg.truncate.strategy == "binary"
    if stage == "evaluate":
        return True
    return stage_model(cfg, stage) is not None


class StageWorker:
    """``map_batches`` callable: batch of ``{"id", "record"}`` in, outcomes out."""

    def __init__(self, cfg_raw: dict[str, Any], stage: str, model: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = Config.model_validate(cfg_raw)
        self.stage = stage
        self.model = model or stage_model(self.cfg, stage)  # evaluate: the model under test
        self._engine: Engine | None = None
        self._grader = None

    def engine(self) -> Engine:
        if self._engine is None:
            from palign.engines import build_engine
            from palign.models import resolve_model

            section = getattr(self.cfg, self.stage)
            path = resolve_model(self.model, self.cfg.models.cache_dir)
            self._engine = build_engine(engine_spec(section.engine, path, self.cfg.run.seed,
                                                     self.stage))
            log.info("%s: engine %s ready for %s", self.stage, self._engine.name, self.model)
        return self._engine

    def grader(self) -> Any:
        if self._grader is None:
            from palign.grading import Grader

            section = getattr(self.cfg, self.stage)
            self._grader = Grader(timeout_s=section.grade_timeout_s)
        return self._grader

    def _process(self, rows: list[dict[str, Any]]) -> tuple[list[Outcome], int]:
        if self.stage == "generate":
            from palign.stages.generate import generate_rows

            teacher = self.engine if self.cfg.models.teacher else None
            return generate_rows(rows, teacher, self.cfg.generate), 0
        if self.stage == "truncate":
            from palign.stages.truncate import truncate_rows

            judge = self.engine() if stage_needs_engine(self.cfg, "truncate") else None
            return truncate_rows(rows, judge, self.cfg.truncate)
        if self.stage == "align":
            from palign.stages.align import align_rows

            return align_rows(rows, self.engine(), self.grader(), self.cfg.align), 0
        if self.stage == "evaluate":
            from palign.stages.evaluate import evaluate_rows

            return evaluate_rows(rows, self.engine(), self.grader(), self.cfg.evaluate), 0
        raise ValueError(f"unknown stage {self.stage!r}")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [json.loads(r) for r in batch["record"]]
        start = time.monotonic()
        try:
            outcomes, calls = self._process(rows)
        except Exception:
            log.exception("%s: batch of %d failed; retrying its rows one by one on a fresh "
                          "engine", self.stage, len(rows))
            self._drop_engine()  # an engine that raised mid-step may hold half-done requests
            outcomes, calls = [], 0
            for row in rows:
                try:
                    one, c = self._process([row])
                except Exception as err:  # noqa: BLE001 - a row must never kill the job
                    one, c = [rejected(row, f"{self.stage} failed: {type(err).__name__}: {err}")], 0
                outcomes += one
                calls += c
        telemetry.stage_batch(self.stage, rows_in=len(rows),
                              records=[o.record for o in outcomes if o.ok],
                              rejected=sum(not o.ok for o in outcomes),
                              seconds=time.monotonic() - start)
        out: dict[str, list[Any]] = {"id": [], "ok": [], "record": [], "calls": []}
        for n, (row, o) in enumerate(zip(rows, outcomes)):
            payload = o.record if o.ok else reject_row(row["id"], self.stage, o.reason, row)
            out["id"].append(str(row["id"]))
            out["ok"].append(o.ok)
            out["record"].append(json.dumps(payload, ensure_ascii=False, default=str))
            out["calls"].append(calls if n == 0 else 0)
        return out

    def _drop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - it is being thrown away either way
                log.warning("%s: closing the failed engine raised", self.stage, exc_info=True)

    def __del__(self) -> None:
        if self._grader is not None:
            self._grader.close()
