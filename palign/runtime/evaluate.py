"""The evaluate stage's driver: every model under test on every benchmark, each (model,
benchmark) pair a folder resumed by id, through the same actor pools as the other stages; then
the results table (``palign.report``)."""

from __future__ import annotations

import logging
import time

from palign.common.failures import StageFailed
from palign.config import Config
from palign.config.paths import absolute_paths
from palign.data import storage
from palign.data.digest import count_rows
from palign.data.layout import new_token
from palign.data.shards import done_index, reject_reasons
from palign.runtime.accounting import account
from palign.runtime.dataplane import Plan, plan
from palign.runtime.fingerprints import check_and_record, evaluate_fingerprint, ingest_fingerprint
from palign.runtime.runner import (
    StageError,
    ingest_once,
    prepare_output,
    stream,
)
from palign.runtime.spec import WorkerSpec
from palign.runtime.summary import StageSummary, engine_stats
from palign.stages.evaluate import EvalModel

log = logging.getLogger(__name__)


def eval_model_path(cfg: Config, model: EvalModel) -> str:
    """Where the model under test is: the train export (or a LoRA run's adapter), the
    configured student, or as given."""
    if model.model in ("trained", "adapter"):
        trained = model.model == "trained"
        path = cfg.trained_model_dir() if trained else cfg.trained_adapter_dir()
        marker = "config.json" if trained else "adapter_config.json"
        if not storage.is_file(storage.join(path, marker)):
            what = "trained model" if trained else "LoRA adapter (train.lora)"
            raise StageError(f"evaluate.models[{model.label}]: no {what} at {path}: run "
                             "the train stage first, or name a model folder")
        return path
    if model.model == "student":
        return cfg.models.student
    return model.model


def run_evaluate_stage(cfg: Config) -> StageSummary:
    """Every model under test on every benchmark, n graded samples per problem; then the
    results table and plots. Resumes per (model, benchmark) folder by id."""
    from palign.report import write_results

    start = time.time()
    cfg = absolute_paths(cfg)  # the benchmarks' paths too, as their ingest records them
    root = cfg.stage_dir("evaluate")
    summary = StageSummary("evaluate", output_dir=root)
    benchmarks, inputs = {}, {}
    for b in cfg.evaluate.benchmarks:
        folder = storage.join(root, "_ingest", b.name)
        data = b.as_data(b.path)
        ingest_once(cfg, folder, data, restart="evaluate")
        benchmarks[b.name], inputs[b.name] = folder, ingest_fingerprint(data)
    paths = {m.label: eval_model_path(cfg, m) for m in cfg.evaluate.models}  # fail early
    for m in cfg.evaluate.models:  # before any work: no folder holds another config's rows
        for name in benchmarks:
            check_and_record(storage.join(root, m.label, name),
                             evaluate_fingerprint(cfg, paths[m.label], inputs[name]),
                             f"evaluate's output for {m.label} on {name}", "evaluate")
    token = new_token()  # this stage run's: its shards' names and its folders' fence
    for m in cfg.evaluate.models:
        work = Plan()
        for name, folder in benchmarks.items():
            out = storage.join(root, m.label, name)
            prepare_output(out, cfg.run.retry_rejects, token)
            work.add(plan(folder, done_index(out), extra={
                "benchmark": name, "model": m.label, "model_path": paths[m.label]}))
        summary.rows_in += work.rows_in
        summary.skipped += work.skipped
        log.info("evaluate %s (%s): %d problem(s) to do", m.label, paths[m.label], work.pending)
        if not work.pending:
            continue
        spec = WorkerSpec.of(cfg, "evaluate", paths[m.label], token)
        done, tally = stream(cfg, spec, work)
        summary.processed += done
        for key, value in tally.items():
            summary.engine[key] = (max if key == "peak_in_flight" else sum)(
                (summary.engine.get(key, 0), value))
    for m in cfg.evaluate.models:
        for name, folder in benchmarks.items():
            out = storage.join(root, m.label, name)
            account(f"evaluate {m.label} on {name}", folder, out, "evaluate")
            summary.rows_out += count_rows(out)
            summary.reasons += reject_reasons(out)
    summary.rejected = len(summary.reasons)
    # too many rejects (every prompt too long, say) fail the run with their reasons first
    summary.check_rejects("evaluate.max_reject_share", cfg.evaluate.max_reject_share)
    try:
        results = write_results(cfg.run.output_dir, cfg.run.name,
                                [(m.label, b) for m in cfg.evaluate.models for b in benchmarks])
    except ValueError as err:  # nothing to score: a failed run (exit 1), not a bad config
        raise StageFailed(f"evaluate: {err}") from err
    for label, per_bench in results.metrics.items():
        for bench, metrics in per_bench.items():
            summary.stats[f"{label}.{bench}.pass@1"] = metrics["pass@1"]
    summary.report = str(results.results_md)
    summary.stats.update(engine_stats(summary.engine))
    summary.wall_s = time.time() - start
    return summary
