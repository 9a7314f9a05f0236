"""The Ray side of training, both ends of it: the only part of the loop that imports Ray.

- Driver: ``fit(cfg, train_fn, ...)`` runs ``palign.train.loop.train_worker`` in a Ray Train
  ``TorchTrainer`` of ``train.num_workers`` workers (resources from ``palign.runtime.resources``),
  storage ``<storage_path>/<run.name>-train``, keeping ``train.keep_checkpoints`` checkpoints and
  restarting the worker group up to ``train.max_failures`` times.
- Worker: ``RayBackend``: rank, world and device from ``ray.train.get_context()``; each rank
  writes its checkpoint shards into a fresh local folder that ``ray.train.report`` publishes as
  one checkpoint (Ray merges the ranks' files into ``checkpoint_<step>/`` on the run's storage,
  which may be object storage), uploading in the background while training goes on
  (``train.checkpoint_upload: async``, Ray Train's asynchronous upload; the end of the run
  waits for it) and removing the local copy once uploaded; on start
  ``ray.train.get_checkpoint()`` (the run's latest, after a worker-group restart or when the
  same run is started again) is the one to resume from: used in place on a local or shared
  file system, else each rank copies only the files it needs from the storage
  (``palign.train.checkpoints.RemoteResume``). Each step's loss
  and throughput also go to the Prometheus gauges of ``palign.runtime.telemetry`` (rank 0).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import torch

from palign.config import Config
from palign.runtime import telemetry
from palign.stages.train import TrainSection
from palign.train.backend import Backend, device_for
from palign.train.checkpoints import LocalResume, RemoteResume, Resume
from palign.train.paths import checkpoint_name


class RayBackend(Backend):
    name = "ray"
    under_ray = True
    _handed_over: Path | None = None  # the checkpoint folder last handed to Ray to upload

    @contextlib.contextmanager
    def resume(self, cfg: Config) -> Iterator[Resume | None]:
        import pyarrow.fs as pafs

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        if isinstance(ckpt.filesystem, pafs.LocalFileSystem):  # local or shared: in place
            yield LocalResume(Path(ckpt.path))
            return
        workdir = Path(tempfile.mkdtemp(prefix="palign-restore-"))
        try:  # each rank copies what it needs (checkpoints.rank_files)
            yield RemoteResume(ckpt.filesystem, ckpt.path, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def checkpoint_dir(self, cfg: Config, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"palign-{checkpoint_name(step)}-"))

    def publish(self, cfg: Config, metrics: dict[str, Any], ckpt_dir: Path | None,
                step: int) -> None:
        from ray.train import CheckpointUploadMode

        if self.rank == 0:  # Prometheus gauges through Ray's metrics agent
            telemetry.train_step(metrics.get("loss"), metrics.get("tokens_per_s"))
        if ckpt_dir is None:
            ray.train.report(metrics)
            return
        upload = cfg.train.checkpoint_upload
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
            checkpoint_dir_name=checkpoint_name(step),
            checkpoint_upload_mode=(CheckpointUploadMode.ASYNC if upload == "async"
                                    else CheckpointUploadMode.SYNC),
            delete_local_checkpoint_after_upload=True)
        self._handed_over = ckpt_dir  # Ray removes the local copy once it is uploaded

    def after_checkpoint(self, cfg: Config, ckpt_dir: Path) -> None:
        if self._handed_over != ckpt_dir:  # publishing failed
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def ray_train_backend(tc: TrainSection) -> RayBackend:
    """This process as a Ray Train worker (``ray.train.get_context()``)."""
    ctx = ray.train.get_context()
    device = torch.device("cpu")
    if tc.use_gpu:
        from ray.train.torch import get_device

        device = device_for(tc, get_device())
    return RayBackend(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device)


def fit(cfg: Config, train_fn: Any, worker_config: dict[str, Any], env: dict[str, str]) -> Any:
    """Run ``train_fn(worker_config)`` in the training workers under Ray Train (the trainer
    passes ``palign.train.loop.train_worker``); Ray's ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from palign.data import storage
    from palign.runtime.resources import train_request
    from palign.train.paths import run_name, storage_path

    tc = cfg.train
    store = storage_path(cfg)
    storage.make_dir(store)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(**train_request(tc).scaling_config_kwargs()),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=store,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": env},
            # Ray Train's per-rank INFO lines (each report, each checkpoint) stay in its log
            # files under the session's logs/train/; the console shows rank 0's step line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()
