"""Running stages as streaming Ray Data pipelines: read the previous stage's committed shards,
skip the ids already done, run the rest through the stage's actor pool, whose workers write
the results where the run's output lives.

A stage's input is the output of the closest earlier stage the config lists; the first listed
stage reads the ingested data (``<output_dir>/ingest/``, written once by parallel tasks,
``palign.runtime.source``). The driver only plans from indexes (``palign.runtime.dataplane``),
watches progress and adds up counts: no row passes through it, so ``run.output_dir`` may be a
local folder, a shared mount or ``s3://``/``gs://`` (``palign.data.storage``).

A stage ends in one of two ways: its summary, or :class:`~palign.common.failures.StageFailed` with a
message for a person, after keeping what it wrote. It fails when its engine keeps failing, when
its rejects pass ``<stage>.max_reject_share`` of its rows, or when no row came out of it. A
whole run holds ``<output_dir>/_LOCK`` (``palign.data.runlock``): a second run on the same folder
refuses to start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

from palign.common.failures import StageFailed
from palign.common.logs import ProgressLine
from palign.config import Config, DataSection, stages_before
from palign.config.paths import absolute_paths
from palign.data import fingerprint, storage
from palign.data.digest import count_rows, write_digest, write_digests
from palign.data.fence import write_epoch
from palign.data.ingest import source_pieces
from palign.data.layout import DONE_MARKER, REJECTS, new_token
from palign.data.shards import clean_uncommitted, done_index, release_rejects
from palign.runtime import signals
from palign.runtime.accounting import account
from palign.runtime.dataplane import Plan, dataset, plan
from palign.runtime.environment import forwarded_env
from palign.runtime.fingerprints import check_and_record, ingest_fingerprint, row_stage_fingerprints
from palign.runtime.placement import batches_per_replica, engine_pool_kwargs
from palign.runtime.resources import engine_request
from palign.runtime.source import finish_ingest, ingest_block
from palign.runtime.spec import WorkerSpec
from palign.runtime.summary import (
    StageSummary,
    engine_stats,
    fill_totals,
    ingest_summary,
    last_error_line,
)
from palign.runtime.telemetry import ADDITIVE
from palign.runtime.watchdog import Watchdog
from palign.runtime.worker import StageWorker
from palign.stages.registry import REGISTRY

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage that cannot start (its input is missing); raised before any work."""


def init_ray(cfg: Config) -> None:
    """Join ``ray.address``; inside a Ray job (``RAY_ADDRESS`` set by the job server) join the
    job's cluster; otherwise start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {}
    if address is None:
        # "local", not None: ray.init(None) joins any cluster `ray start` left on this machine.
        address = "local"
        # A local Ray: forward the driver's settings to its workers. A job's workers get them
        # from the job's runtime_env (ray_jobs/runtime_env.yaml) instead.
        env = forwarded_env()
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        dashboard = cfg.ray.include_dashboard
        if dashboard is None:
            dashboard = "train" in cfg.run.stages
        kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=dashboard)
    # ray.init sets Ray's own SIGTERM handler (an exit with a stack dump): a run's stop by
    # signal stays palign's (palign.runtime.signals).
    with signals.reclaimed():
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # Off a terminal (a log file, `ray job logs`) Ray Data would log a progress block every
    # 10 s; the driver's progress line (``ProgressLine``) says the same in one line.
    ctx.enable_progress_bars = cfg.ray.progress_bars and sys.stdout.isatty()


def ingest(cfg: Config) -> str:
    """Ingest the source once per output folder (rejects written once); the ingest folder.
    Fails when more than ``data.max_reject_share`` of the source is unusable."""
    folder = storage.join(cfg.run.output_dir, "ingest")
    ingest_once(cfg, folder, cfg.data, restart="ingest")
    summary = ingest_summary(cfg)
    if summary is not None:
        summary.check_rejects("data.max_reject_share", cfg.data.max_reject_share)
    return folder


def ingest_once(cfg: Config, folder: str, data: DataSection, restart: str = "ingest") -> None:
    """Validate the source into ``folder`` with one Ray Data task per source file (or per piece
    of a large file: ``data.piece_mib``), then settle limits and repeated ids from the indexes
    (``palign.runtime.source``). A finished ingest (``_DONE``) is kept; an unfinished one is
    redone. A finished one whose indexes do not hold the rows its marker counts (written by an
    older palign, or damaged) fails the run, and so does one made from another data section
    or source (``ConfigChanged``, naming the fields; ``--restart restart`` redoes it)."""
    marker = storage.join(folder, DONE_MARKER)
    expected = ingest_fingerprint(data)
    if storage.exists(marker):
        fingerprint.check(folder, expected, "the ingested data", restart, has_rows=True)
        rows = json.loads(storage.read_text(marker)).get("rows")
        write_digests(folder)  # kept as it is when up to date
        found = count_rows(folder)
        if rows != found:
            raise StageFailed(f"{folder}/ is marked finished with {rows} rows but its indexes "
                              f"hold {found} (written by another palign version, or damaged): "
                              "remove the folder to ingest again")
        return
    storage.delete_dir(folder)
    fingerprint.write(folder, expected)
    files = source_pieces(data, data.piece_mib << 20)
    if files:
        import ray

        init_ray(cfg)
        items = [dataclasses.asdict(f) for f in files]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ingest_block, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"data": data.model_dump(mode="json"), "folder": folder,
                       "shard_rows": cfg.output.shard_rows})
        rows = rejects = 0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows += sum(batch["rows"].to_pylist())
                rejects += sum(batch["rejects"].to_pylist())
        except StageFailed:
            raise
        except Exception as err:  # noqa: BLE001 - Ray's wrapping of a task's failure
            # a task's own StageFailed (a full disk: DiskFull) keeps its message; the ingest
            # stays unfinished (no _DONE) and is redone by the next run
            own = _remote_stage_failed(str(err))
            raise StageFailed(own or f"ingest failed: {last_error_line(err)}") from err
        log.info("ingest: %d file(s) read in %d piece(s): %d rows, %d rejects before limits "
                 "and repeats", len({f.path for f in files}), len(files), rows, rejects)
    finish_ingest(folder, data)
    write_digests(folder)


def stage_input(cfg: Config, stage: str) -> str:
    """The folder a stage reads: the closest earlier listed stage's output, or the ingest."""
    earlier = stages_before(cfg.run.stages, stage)
    if not earlier:
        return ingest(cfg)
    prev = earlier[-1]
    folder = cfg.stage_dir(prev)
    if not storage.is_dir(folder):
        raise StageError(f"{stage} reads the output of {prev} ({folder}), which does not exist: "
                         f"run `palign {prev}` first")
    return folder


def prepare_output(folder: str, retry: str, token: str) -> None:
    """Before the stage run of ``token`` writes ``folder`` (under the run's lock): seal what is
    there into the digests and fence the folder for this run (``shards.write_epoch``: a late
    commit of a superseded run's worker is never seen), drop what a killed write left, release
    the rejects a rerun retries, and gather the indexes into their digests again."""
    for part in (folder, storage.join(folder, REJECTS)):
        write_digest(part)  # the seal: what readers see now
        write_epoch(part, token)
        clean_uncommitted(part)  # data of no visible index, and indexes past the seal
    release_rejects(folder, retry, token)
    write_digests(folder)  # a resumed stage reads what it has done from one file


def run_stage(cfg: Config, stage: str) -> StageSummary:
    """Run one stage to completion (resuming where an earlier run stopped)."""
    start = time.time()
    cfg = absolute_paths(cfg)  # as the actors must see it (the fingerprints record it so)
    source = stage_input(cfg, stage)
    out_dir = cfg.stage_dir(stage)
    token = new_token()  # this stage run's: its shards' names and the folder's fence
    prepare_output(out_dir, cfg.run.retry_rejects, token)
    check_and_record(out_dir, row_stage_fingerprints(cfg, [stage])[stage], f"{stage}'s output",
                     stage)
    definition = REGISTRY[stage]
    work = plan(source, done_index(out_dir), columns=definition.input_columns)
    needs = work.pending and definition.needs_engine(cfg) and definition.engine_for(work.columns)
    model = definition.model(cfg) if needs else None
    summary = run_planned(cfg, WorkerSpec.of(cfg, stage, model, token), work, start)
    account(stage, source, out_dir)  # every input id out or rejected, exactly once
    summary.check_rejects(f"{stage}.max_reject_share", getattr(cfg, stage).max_reject_share)
    return summary


def run_planned(cfg: Config, spec: WorkerSpec, work: Plan,
                start: float | None = None) -> StageSummary:
    """Run the planned rows through ``spec``'s stage into ``spec.out_dir`` (prepared by the
    caller: ``prepare_output`` with ``spec.token``), then its summary: counts and statistics
    from the indexes, the engine's work, the wall time since ``start`` (default: now). How
    ``run_stage`` runs a listed stage, and how a tool runs a stage of its own on a sample
    (``WorkerSpec.for_tool``; a sample's plan marks the other rows done)."""
    start = time.time() if start is None else start
    summary = StageSummary(spec.stage, rows_in=work.rows_in, skipped=work.skipped,
                           output_dir=spec.out_dir)
    log.info("%s: %d rows in, %d already done, %d to process", spec.stage, work.rows_in,
             work.skipped, work.pending)
    if work.pending:
        summary.processed, summary.engine = stream(cfg, spec, work)
        write_digests(spec.out_dir)  # for the summary below, the next stage and reruns
    summary.wall_s = time.time() - start
    fill_totals(summary, spec.out_dir, spec.definition())
    summary.stats.update(engine_stats(summary.engine))
    return summary


def stream(cfg: Config, spec: WorkerSpec, work: Plan) -> tuple[int, dict[str, float]]:
    """Run the planned rows through the actor pool of ``spec``'s stage (serving
    ``spec.model``; its pool and retries from ``spec``'s section); the workers write the
    results. Returns (rows done, engine tallies: see ``StageSummary.engine``)."""
    model = spec.model
    section = spec.validated_section()
    engine = section.engine
    if model is not None and not engine.is_remote():
        from palign.engines.models import prefetch

        prefetch(model, spec.cache_dir)  # once here, not in every actor at once
    import ray

    init_ray(cfg)
    stage = spec.stage
    _bound_actor_starts(engine.max_failures)
    ledger = start_ledger(section.max_row_attempts, engine.max_failures)
    progress = ProgressLine(log, stage, work.pending)  # counts the rows done
    tally: dict[str, float] = {**{key: 0 for key in ADDITIVE}, "peak_in_flight": 0,
                               "init_s": 0.0, "work_tokens": 0}
    # The pool's resources (GPUs, a placement group per tensor-parallel replica) come from
    # palign.runtime.resources; its placement groups are removed when the stage ends.
    try:
        per_replica = batches_per_replica(engine.in_flight_per_replica(), engine.batch_size)
        # The watchdog kills an actor that stops running (SIGSTOPped, frozen): a hung process
        # cannot time its own engine calls out (palign.runtime.watchdog).
        with engine_pool_kwargs(engine_request(stage, engine), per_replica) as pool, \
                Watchdog(stage, ledger, engine.request_timeout_s):
            ds = dataset(work.items).map_batches(
                StageWorker,
                # each actor gets its stage's section and what else it reads, not the config
                fn_constructor_kwargs={"spec": spec, "ledger": ledger},
                batch_size=engine.batch_size,
                # A replica that dies (a machinery failure, an OOM kill, a lost node) is
                # restarted and the batch it held is retried, so no row is lost: Ray Data gives
                # actor pools max_restarts=-1 and max_task_retries=-1 (passing them here is
                # deprecated in Ray 2.60); the ledger bounds the retries of one row.
                **pool,
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for key in (*ADDITIVE, "work_tokens"):
                    tally[key] += int(sum(batch[key]))
                # Every replica reports its own start with each batch: the slowest one's.
                for key in ("peak_in_flight", "init_s"):
                    tally[key] = max(tally[key], max(batch[key].tolist(), default=0))
                progress.add(int(sum(batch["rows"])), int(sum(batch["rejected"])))
    except StageFailed:
        raise
    except Exception as err:  # noqa: BLE001 - Ray's wrapping of what failed the stage
        done = _written(spec.out_dir, work, progress.done)
        raise _stage_failure(stage, err, done, work.pending) from err
    finally:
        ray.kill(ledger)
    return progress.done, tally


def _written(out_dir: str, work: Plan, reported: int) -> int:
    """The rows this run committed (kept or rejected) before its stage failed. The driver's
    count holds only the batches that came back to it; a worker commits each batch before
    that, and an actor that dies or a stream that fails after the commit leaves rows on disk
    the driver never saw, so its own count would say fewer than a rerun will skip. The
    indexes say how many there are (the ids the plan found done subtracted); the driver's
    count where they cannot be read (a store that is down) or the plan marked rows done that
    are not in this folder (a tool's sample)."""
    try:
        on_disk = len(done_index(out_dir)) - work.skipped
    except Exception:  # noqa: BLE001 - the message must not fail over a count
        return reported
    return max(reported, on_disk)


def start_ledger(max_row_attempts: int, max_failures: int) -> Any:
    """The stage's attempt ledger (``palign.runtime.attempts``), a Ray actor on this (the driver's)
    node, so that it outlives any engine actor and any worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from palign.runtime.attempts import AttemptLedger

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (ray.remote(AttemptLedger)
            .options(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here)
            .remote(max_row_attempts, max_failures))


def _bound_actor_starts(max_failures: int) -> None:
    """An engine actor whose start fails (a model that does not load, a grader that cannot
    start) is started again, ``max_failures`` times in all, then the stage fails with its
    error: Ray Data retries a constructor that raises, and replaces an actor that dies while
    starting, as many times as these say."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.actor_init_retry_on_errors = True
    ctx.actor_init_max_retries = max_failures - 1
    ctx.max_consecutive_actor_init_deaths = max_failures - 1


def _stage_failure(stage: str, err: BaseException, done: int, total: int) -> StageFailed:
    """What failed the stage, from under Ray's wrappers, as a StageFailed a person can read."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, StageFailed):
            return StageFailed(f"{cause} ({done} of {total} rows were written)")
        cause = getattr(cause, "cause", None) or cause.__cause__
    own = _remote_stage_failed(str(err))
    if own is not None:
        return StageFailed(f"{own} ({done} of {total} rows were written)")
    return StageFailed(f"{stage} failed after {done} of {total} rows were written: "
                       f"{last_error_line(err)}")


def _remote_stage_failed(text: str) -> str | None:
    """The message of the last ``StageFailed`` (or subclass, such as ``DiskFull``) a worker
    raised, from the remote traceback in Ray's error text: Ray Data's ``UserCodeException``
    keeps no cause to walk."""
    import re

    from palign.common import failures

    found = None
    # The module's own name, so that a move of failures cannot silently stop the match.
    pattern = rf"^{re.escape(failures.__name__)}\.(\w+): (.+)$"
    for match in re.finditer(pattern, text, re.M):
        cls = getattr(failures, match.group(1), None)
        if isinstance(cls, type) and issubclass(cls, StageFailed):
            found = match.group(2).strip()
    return found
