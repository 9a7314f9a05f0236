"""The train stage's driver: student SFT on the aligned rows with Ray Train + DeepSpeed ZeRO.

``run_train(cfg)`` starts a Ray Train ``TorchTrainer`` of ``train.num_workers`` workers
(``palign.train.ray_backend.fit``), each running ``palign.train.loop.train_worker`` (see that
module for the loop's parts, the step plan, the loss normalisation and the checkpoints), and
returns a ``TrainResult``.

Data: before the workers start, ``palign.train.prepare`` tokenises and packs the align stage's
rows once, in Ray Data tasks, into int32 token shards and a unit table under
``<output_dir>/train/data/`` (reused while the align rows and settings stay the same), and the
rows that cannot be trained on go to ``<output_dir>/train/rejects/``, each id once. A
deterministic step plan (seeded permutation per epoch, fixed slice per rank and micro-batch)
decides what each rank trains on, and each rank reads only its own units by ranged reads: the
output folder can be a bucket (``s3://``, ``gs://``) or shared storage, and a resumed run is
exact (the position is just the step number). Rank 0 writes the model export
(``<output_dir>/train/model/``).

Resume (Ray 2.60, Ray Train V2, the default there): checkpoints are reported with
``ray.train.report`` and land in ``<storage_path>/<run.name>-train/checkpoint_<step>/`` (the
storage path defaults to ``<output_dir>/train/ray``; on a multi-node cluster it must be shared
or cloud storage). Ray records the reported checkpoints in a snapshot in that run folder. A
worker-group restart after a failure (``train.max_failures``) and a later run with the same
storage path and name both start with ``ray.train.get_checkpoint()`` returning the latest
checkpoint, from which the loop restores weights, optimizer, scheduler, RNG and data position.
So rerunning the same config after a crash continues the run; to start over, delete that run
folder or change ``run.name``. Ray keeps the newest ``train.keep_checkpoints`` checkpoints.
A rerun whose model, data or a setting that changes the weights differs from the one the
checkpoints were made under is refused before Ray starts (``palign.train.identity``: the train
fingerprint, recorded in ``<output_dir>/train/_FINGERPRINT.json``); the number of workers may
change while the global batch stays (an elastic resume, ``palign.train.checkpoints``).

Without Ray (``torchrun``)::

    torchrun --nproc-per-node N -m palign.train.loop CONFIG.yaml
    # multi-node: torchrun --nnodes M --node-rank R --rdzv-endpoint HOST:PORT ... (same command)

runs the same loop; checkpoints go to the same folder (``<storage_path>/<run.name>-train/``) and
a rerun resumes from the newest complete one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palign.config import Config
from palign.config.paths import absolute_paths
from palign.data.shards import shard_files
from palign.runtime.environment import forwarded_env
from palign.train import callbacks
from palign.train.identity import guard_resume
from palign.train.paths import DATA_KEY, run_name, storage_path
from palign.train.prepare import NoTrainableRows, prepare

logger = logging.getLogger(__name__)


class TrainStageError(RuntimeError):
    """The train stage cannot start (no aligned rows)."""


@dataclass
class TrainResult:
    """What a train run did. ``losses[i]`` is the loss of optimizer step ``i + 1`` (global
    token-weighted mean), over the whole run including steps done before a resume."""

    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0  # real input tokens per second, all workers, this invocation
    packing_efficiency: float = 0.0
    rows_used: int = 0
    rows_rejected: int = 0
    checkpoint_dir: str | None = None  # the latest checkpoint (Ray storage)
    model_dir: str = ""
    wall_s: float = 0.0
    resumed_from: int = 0  # the step this invocation resumed after (0: started from scratch)
    rows_per_step: list[int] = field(default_factory=list)  # rows each step took, all workers
    trainable_params: int = 0
    total_params: int = 0
    optimizer_params: int = 0  # parameter elements the optimizer holds, all workers
    adapter_dir: str | None = None  # a LoRA run's adapter (PEFT's format)


def worker_env() -> dict[str, str]:
    """Environment for the training workers: palign importable, and the driver's settings.

    When palign is imported from a source tree (not an installed package), that tree goes on
    the workers' ``PYTHONPATH``; an installed palign needs nothing.
    """
    import palign

    env = forwarded_env()
    root = Path(palign.__file__).resolve().parent.parent
    installed = any(part in ("site-packages", "dist-packages") for part in root.parts)
    if not installed:
        paths = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_train(cfg: Config) -> TrainResult:
    """Fine-tune the student on ``<output_dir>/align/`` and export it to
    ``<output_dir>/train/model/``; resumes a run of the same name from its latest checkpoint.

    Starts (or joins, per ``ray.address``) Ray. Raises ``TrainStageError`` when there are no
    aligned shards, ``palign.data.fingerprint.ConfigChanged`` (before Ray starts) when the
    latest checkpoint was made under another model, data or optimizer setting
    (``palign.train.identity``), and Ray's ``TrainingFailedError`` when the workers fail more than
    ``train.max_failures`` times (the checkpoints stay; run again to resume).
    """
    from palign.engines.models import prefetch
    from palign.engines.revisions import pin
    from palign.runtime.runner import init_ray

    started = time.time()
    tc = cfg.train
    align = cfg.stage_dir("align")
    if not shard_files(align):
        raise TrainStageError(f"train reads the align stage's shards in {align}, and there are "
                              "none: run `palign align` first")
    # Before any work: a callback that cannot be made fails here (ConfigError), not in every
    # worker; a checkpoint made under another model, data or optimizer setting is refused
    # (ConfigChanged); otherwise this run's fingerprint is recorded before its first checkpoint.
    callbacks.load(tc)
    guard_resume(cfg)
    # One commit of a hub student for the preparation's tokenizer and every rank, whatever
    # the hub's branch does while they start (the fingerprint above recorded that commit).
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"student": pin(cfg.models.student)})})
    prefetch(cfg.models.student, cfg.models.cache_dir)  # once here, not in every worker
    init_ray(cfg)
    try:  # tokenised and packed once, by Ray Data tasks; each rank reads only its units
        prepared = prepare(cfg)
    except NoTrainableRows as err:
        raise TrainStageError(str(err)) from err
    from palign.train import ray_backend
    from palign.train.loop import train_worker

    logger.info("train: %d workers (%s), ZeRO-%d, storage %s/%s", tc.num_workers,
                "GPU" if tc.use_gpu else "CPU", tc.zero_stage, storage_path(cfg), run_name(cfg))
    result = ray_backend.fit(cfg, train_worker,
                             {**absolute_paths(cfg, student=True).model_dump(mode="json"),
                              DATA_KEY: prepared.folder}, worker_env())
    metrics: dict[str, Any] = dict(result.metrics or {})
    losses = [float(x) for x in metrics.get("losses", [])]
    out = TrainResult(
        steps=len(losses),
        final_loss=losses[-1] if losses else None,
        losses=losses,
        tokens_per_s=float(metrics.get("run_tokens_per_s", 0.0)),
        packing_efficiency=float(metrics.get("packing_efficiency", 0.0)),
        rows_used=int(metrics.get("rows_used", 0)),
        rows_rejected=int(metrics.get("rows_rejected", 0)),
        checkpoint_dir=result.checkpoint.path if result.checkpoint else None,
        model_dir=str(metrics.get("model_dir") or cfg.trained_model_dir()),
        wall_s=time.time() - started,
        resumed_from=int(metrics.get("resumed_from", 0)),
        rows_per_step=[int(x) for x in metrics.get("rows_per_step", [])],
        trainable_params=int(metrics.get("trainable_params", 0)),
        total_params=int(metrics.get("total_params", 0)),
        optimizer_params=int(metrics.get("optimizer_params", 0)),
        adapter_dir=metrics.get("adapter_dir"),
    )
    logger.info("train: %d steps, final loss %s, %.0f tokens/s, model in %s", out.steps,
                out.final_loss, out.tokens_per_s, out.model_dir)
    return out

