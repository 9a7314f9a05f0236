"""Where a training process runs: its rank and device, and where its checkpoints and metrics go.

One interface, two small implementations: ``palign.train.ray_backend.RayBackend`` (a Ray Train
worker; the only training module that imports Ray, with the driver side in the same file) and
``TorchrunBackend`` here (``torchrun``, no Ray: checkpoints are folders on a shared path and
metrics are log lines). ``start(tc, backend)`` sets up ``torch.distributed`` and DeepSpeed's
comm for it (torchrun's when none is given) and returns it. The step loop
(``palign.train.loop``) only talks to a ``Backend``.

DeepSpeed on CPU: the only C++ op DeepSpeed would build here is its shared-memory comm op,
compiled on the first ``init_distributed`` and used only by ``inference_all_reduce`` (tensor-
parallel inference), never by training. ``_skip_cpu_shm_comm`` marks it incompatible, so nothing
is compiled and no C++ compiler is needed; ``PALIGN_DS_SHM_COMM=1`` keeps DeepSpeed's default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from palign.config import Config
from palign.stages.train import TrainSection
from palign.train.checkpoints import LocalResume, Resume
from palign.train.paths import CHECKPOINT_PREFIX, STATE_FILE, checkpoint_name, run_dir

ENV_SHM_COMM = "PALIGN_DS_SHM_COMM"
logger = logging.getLogger("palign.train.backend")


class Backend(ABC):
    """A training process: rank, world size, local rank and device, and the run's storage."""

    name = ""
    under_ray = False

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @abstractmethod
    def resume(self, cfg: Config) -> contextlib.AbstractContextManager[Resume | None]:
        """The checkpoint to resume from (the same on every rank), or None for a fresh start;
        valid for the duration of the ``with``."""

    @abstractmethod
    def checkpoint_dir(self, cfg: Config, step: int) -> Path:
        """The local folder this rank writes step ``step``'s checkpoint into."""

    @abstractmethod
    def publish(self, cfg: Config, metrics: dict[str, Any], ckpt_dir: Path | None,
                step: int) -> None:
        """Report the step's metrics (every rank calls it), with its checkpoint if any."""

    @abstractmethod
    def after_checkpoint(self, cfg: Config, ckpt_dir: Path) -> None:
        """Clean up once the checkpoint is published (whether or not publishing raised)."""


class TorchrunBackend(Backend):
    """torchrun: rank and rendezvous from its environment; checkpoints are written in place
    under ``run_dir(cfg)`` (shared storage when the ranks span nodes), and a checkpoint with
    ``train_state.json`` (written by rank 0 after a barrier) is complete."""

    name = "torchrun"

    @contextlib.contextmanager
    def resume(self, cfg: Config) -> Iterator[Resume | None]:
        import torch.distributed as dist

        # Rank 0 decides, so that every rank loads the same one.
        choice = [latest_local_checkpoint(run_dir(cfg)) if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        yield LocalResume(choice[0]) if choice[0] is not None else None

    def checkpoint_dir(self, cfg: Config, step: int) -> Path:
        return run_dir(cfg) / checkpoint_name(step)

    def publish(self, cfg: Config, metrics: dict[str, Any], ckpt_dir: Path | None,
                step: int) -> None:
        return  # the loop's step line is the report

    def after_checkpoint(self, cfg: Config, ckpt_dir: Path) -> None:
        if self.rank == 0:
            prune_local(run_dir(cfg), cfg.train.keep_checkpoints)


def latest_local_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (with ``train_state.json``) under ``root``, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir()
            if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def prune_local(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir()
                  if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def start(tc: TrainSection, backend: Backend | None = None) -> Backend:
    """Set up torch.distributed and DeepSpeed's comm for ``backend`` (a Ray Train worker's,
    ``palign.train.ray_backend.ray_train_backend``), or for torchrun's environment when None;
    return it."""
    import deepspeed
    import torch.distributed as dist

    if backend is None:
        rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # no launcher: torchrun always sets it
            # One process on its own (a benchmark, a script): a free port, so that two such
            # runs on one machine never meet.
            os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
        device = device_for(tc, torch.device("cuda", local))
        backend = TorchrunBackend(rank, world, local, device)
    os.environ.update(RANK=str(backend.rank), WORLD_SIZE=str(backend.world),
                      LOCAL_RANK=str(backend.local_rank))
    on_gpu = backend.device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(backend.device)
    else:
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
        _skip_cpu_shm_comm()
    if not dist.is_initialized():  # Ray Train has already made the process group
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    else:
        deepspeed.init_distributed()
    return backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_for(tc: TrainSection, gpu: torch.device) -> torch.device:
    if not tc.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is set but this worker sees no CUDA device")
    return gpu


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory comm op (unused by training)."""
    if os.environ.get(ENV_SHM_COMM) == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
