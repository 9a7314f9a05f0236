"""The whole run: the config's stages in order, each on its runner.

``run_pipeline`` checks the config's paths and engine arguments and plans the cluster before any
work, locks the output folder, then runs every stage by its ``driver``: the row stages and
evaluate on Ray Data actor pools (``palign.runtime.runner``), train on Ray Train
(``palign.train.trainer``). It sits
above both, so that neither the stages nor training imports the other's driver. At the end of
every run, and after a stage that failed, it writes the run's page, ``report.html``.
"""

from __future__ import annotations

import logging
import signal

from palign.common.failures import MachineryError, StageFailed
from palign.config import Config
from palign.data import storage
from palign.data.shards import reject_reasons
from palign.runtime import signals
from palign.runtime.evaluate import run_evaluate_stage
from palign.runtime.runner import StageError, init_ray, run_stage
from palign.runtime.summary import StageSummary, ingest_summary, last_error_line, save_summary
from palign.stages import registry

log = logging.getLogger(__name__)


def run_train_stage(cfg: Config) -> StageSummary:
    """Student SFT on Ray Train + DeepSpeed; resumes from its latest checkpoint, unless that
    was made under another model, data or optimizer setting: then ``ConfigChanged`` (exit 2)
    before Ray starts (``palign.train.identity``)."""
    from palign.data.fingerprint import ConfigChanged
    from palign.train.identity import check_resume
    from palign.train.trainer import run_train

    check_resume(cfg)  # run_train checks again (its own callers); cheap: a listing and a stat
    init_ray(cfg)
    try:
        # Ray Train sets a Ctrl-C handler of its own in fit(), one that aborts the training
        # run and exits 0: a stop all the same, and palign's handlers come back after fit.
        with signals.reclaimed(exit_is=signal.SIGINT):
            res = run_train(cfg)
    except (StageError, ConfigChanged):
        raise
    except Exception as err:  # noqa: BLE001 - Ray Train's wrapping of what failed the workers
        raise StageFailed(f"train failed (its checkpoints stay; run again to resume): "
                          f"{last_error_line(err)}") from err
    summary = StageSummary(
        "train", rows_in=res.rows_used + res.rows_rejected, rows_out=res.rows_used,
        rejected=res.rows_rejected, processed=res.rows_used, wall_s=res.wall_s,
        stats={"steps": res.steps, "final_loss": res.final_loss,
               "tokens_per_s": res.tokens_per_s, "packing_efficiency": res.packing_efficiency,
               "trainable_params": res.trainable_params, "total_params": res.total_params},
        output_dir=storage.absolute(cfg.stage_dir("train")), model_dir=str(res.model_dir),
        reasons=reject_reasons(cfg.stage_dir("train")),
    )
    summary.check_rejects("train.max_reject_share", cfg.train.max_reject_share)
    return summary


def run_one(cfg: Config, stage: str) -> StageSummary:
    """One stage, by its driver: the generic actor pool for row stages (``run_stage``),
    evaluate's pools per model under test, or Ray Train. A stage that finishes leaves its
    summary in ``<stage_dir>/_SUMMARY.json`` (``palign.report.summary_file``)."""
    driver = registry.get(stage).driver
    if driver == "train":
        summary = run_train_stage(cfg)
    elif driver == "evaluate":
        summary = run_evaluate_stage(cfg)
    else:
        summary = run_stage(cfg, stage)
    save_summary(summary)
    return summary


def write_report(cfg: Config) -> str | None:
    """Write ``<output_dir>/report.html`` (``palign.report.run_report``); where it is, or None.
    Best effort: a page that cannot be built is a warning, never a failed run (``palign report
    RUN`` builds it again)."""
    from palign.report.run_report import write_run_report

    try:
        return str(write_run_report(cfg.run.output_dir))
    except Exception as err:  # noqa: BLE001 - the run's outcome does not depend on its page
        log.warning("report.html not written: %s: %s", type(err).__name__, err)
        return None


def run_pipeline(cfg: Config, stages: list[str] | None = None,
                 restart: str | None = None) -> list[StageSummary]:
    """Run the given stages (default: the config's) in order; the ingest summary comes first.

    Before any work: the config's paths are checked (``palign.preflight``), the cluster plan is
    made, and the output folder is locked for this run (``RunLocked`` if another run holds it).
    Then ``restart`` (a stage, or ``ingest``) moves that stage's output and every later one's
    aside, and every folder the run resumes is checked against this config's fingerprints
    (``ConfigChanged`` when its rows were made under another: ``palign.runtime.fingerprints``).
    Under ``signals.stop_on_signals`` (as the command runs it) SIGTERM and SIGINT end the run
    with ``Stopped``, its committed work kept and the lock released.
    """
    from palign.data.runlock import RunLock
    from palign.preflight import check_engine_kwargs, check_paths
    from palign.runtime.fingerprints import check_run
    from palign.runtime.fingerprints import restart as move_aside
    from palign.runtime.resources import plan_resources
    from palign.train.identity import checkpoints_folder

    stages = stages or list(cfg.run.stages)
    check_engine_kwargs(cfg, stages)  # a misspelt vLLM engine argument fails here
    check_paths(cfg, stages)  # a missing data file or model folder fails here
    plan_resources(cfg)  # a config the cluster cannot place fails here, before any work
    # A stop by signal (palign.runtime.signals) while the lock is taken or released waits for
    # that to finish, so that no lock is left behind for the next run to wait out.
    with signals.shielded(RunLock(cfg.run.output_dir, stale_s=cfg.run.lock_stale_s)):
        if restart is not None:
            with signals.held():  # a stop waits: no stage is left half moved
                move_aside(cfg, restart, checkpoints_folder(cfg))
        check_run(cfg, stages)  # a folder holding another config's rows fails here
        summaries = []
        try:
            for stage in stages:
                summaries.append(run_one(cfg, stage))
        except (StageFailed, MachineryError):  # the page shows what was done up to it; a
            write_report(cfg)  # refusal before any work (ConfigChanged, ...) writes nothing
            raise
        write_report(cfg)
    first = ingest_summary(cfg)
    return [first, *summaries] if first else summaries
