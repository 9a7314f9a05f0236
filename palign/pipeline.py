"""The whole run: the config's stages in order, each on its runner.

``run_pipeline`` checks the config's paths and engine arguments and plans the cluster before any
work, locks the output folder, then runs every stage: the row stages and evaluate on Ray Data
actor pools (``palign.runtime.runner``), train on Ray Train (``palign.train.trainer``). It sits
above both, so that neither the stages nor training imports the other's driver.
"""

from __future__ import annotations

from palign.core import storage
from palign.core.config import Config
from palign.core.failures import StageFailed
from palign.core.shards import reject_reasons
from palign.runtime.evaluate import run_evaluate_stage
from palign.runtime.runner import StageError, init_ray, run_stage
from palign.runtime.summary import StageSummary, ingest_summary, last_error_line


def run_train_stage(cfg: Config) -> StageSummary:
    """Student SFT on Ray Train + DeepSpeed; resumes from its latest checkpoint."""
    from palign.train.trainer import run_train

    init_ray(cfg)
    try:
        res = run_train(cfg)
    except StageError:
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


def run_pipeline(cfg: Config, stages: list[str] | None = None) -> list[StageSummary]:
    """Run the given stages (default: the config's) in order; the ingest summary comes first.

    Before any work: the config's paths are checked (``palign.preflight``), the cluster plan is
    made, and the output folder is locked for this run (``RunLocked`` if another run holds it).
    """
    from palign.core.runlock import RunLock
    from palign.preflight import check_engine_kwargs, check_paths
    from palign.runtime.resources import plan_resources

    stages = stages or list(cfg.run.stages)
    check_engine_kwargs(cfg, stages)  # a misspelt vLLM engine argument fails here
    check_paths(cfg, stages)  # a missing data file or model folder fails here
    plan_resources(cfg)  # a config the cluster cannot place fails here, before any work
    runners = {"train": run_train_stage, "evaluate": run_evaluate_stage}
    with RunLock(cfg.run.output_dir, stale_s=cfg.run.lock_stale_s):
        summaries = [runners[s](cfg) if s in runners else run_stage(cfg, s) for s in stages]
    first = ingest_summary(cfg)
    return [first, *summaries] if first else summaries
