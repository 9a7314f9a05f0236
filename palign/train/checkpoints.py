"""A training checkpoint: every rank's DeepSpeed shards, its RNG states and the run's position.

Layout of one checkpoint folder (``checkpoint_<step:08d>/``; under Ray Train each rank writes
its files into a local folder and Ray merges them on the run's storage):

- ``ds/``: ``engine.save_checkpoint`` with tag ``ds``: model, optimizer and scheduler state,
  ZeRO shards per rank (ZeRO-3 parameters stay sharded), and ``client_state``: step, epoch,
  position in the epoch, world size, the data's fingerprint and the loss history;
- ``rng/rank_<r>.pt``: rank ``r``'s python, numpy and torch (and CUDA) RNG states;
- ``train_state.json``: the client state without the losses, written by rank 0 after a barrier,
  so a folder that has it is complete.

Restoring (``Resume``): the state file is read first. With the world size it was written by,
each rank fetches only its own files (``rank_files``: the state, its RNG, the rank-independent
``mp_rank_*`` model states and its own ``zero_pp_rank_<r>_*`` shards), so a restore from object
storage moves each rank's share, not the whole checkpoint per rank. With another world size
(elastic resume), one process per node fetches the whole checkpoint and converts it to a
DeepSpeed *universal* checkpoint (``deepspeed.checkpoint.ds_to_universal``: one file per
parameter and optimizer moment, independent of the partitioning), and every rank of the node
loads its new partition from it (``checkpoint.load_universal``). The global batch (workers x
micro-batch x accumulation) must stay the same, so that a step is the same step: going from 2
workers to 1, double ``train.grad_accum``. The sequence-parallel size may change too (its ranks
hold whole parameters, ZeRO-partitioned over every rank like data-parallel ones): then the
data-parallel size in that product is ``workers / sequence_parallel_size``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palign.data.shards import replace_atomically
from palign.stages.train import TrainSection
from palign.train.paths import DS_TAG, STATE_FILE

logger = logging.getLogger("palign.train.checkpoints")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in tensors and plain values only (numpy's key as a tensor),
    so that the file they are saved in loads with ``weights_only=True``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` of a file palign (or DeepSpeed for it) wrote, with ``weights_only=True``:
    tensors, numbers, text and containers of them, never an arbitrary pickled object, whose
    loading could run code planted in a checkpoint folder. A file holding one is refused."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = [ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln]
        what = found[0].split(" was not")[0] if found else "an object torch does not allow"
        raise RuntimeError(f"{path}: refused: it holds more than tensors and plain values "
                           f"({what}), which palign's checkpoints never do") from None


def save(engine: Any, directory: Path, rank: int, client_state: dict[str, Any],
         adapters_only: bool = False) -> None:
    """Every rank writes its DeepSpeed shards and RNG state into ``directory``;
    ``adapters_only`` (a LoRA run): the frozen base is left out, only what trains (the
    adapters, their optimizer state) is written."""
    import torch.distributed as dist

    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=client_state,
                           exclude_frozen_parameters=adapters_only)
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), directory / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = {k: v for k, v in client_state.items() if k not in ("losses", "rows")}
        replace_atomically(directory / STATE_FILE, json.dumps(state, indent=1).encode())


def load(engine: Any, directory: Path, rank: int, strict: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the client state.
    ``strict=False``: the checkpoint may lack frozen weights (a LoRA run's: they come from the
    base model, loaded as at the start)."""
    with _tensor_parallel_query(engine.optimizer):
        load_path, client_state = engine.load_checkpoint(
            str(directory), tag=DS_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=True, load_module_strict=strict)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    rng_file = directory / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_tensors(rng_file))
    else:  # a rank the writing run did not have (elastic resume): its seeded state stays
        logger.info("no RNG state for rank %d in %s", rank, directory)
    return dict(client_state)


@contextlib.contextmanager
def _tensor_parallel_query(optimizer: Any) -> Iterator[None]:
    """While loading: DeepSpeed's universal-checkpoint loader asks the optimizer's ``mpu`` for
    ``get_tensor_model_parallel_world_size``, which the Ulysses groups (``parallel_state_sp``)
    answer only as ``get_model_parallel_world_size``; elsewhere DeepSpeed falls back to that
    name itself. A sequence-parallel rank holds whole parameters, so the loader takes each one
    whole whatever the size says."""
    mpu = getattr(optimizer, "mpu", None)
    if mpu is None or hasattr(mpu, "get_tensor_model_parallel_world_size"):
        yield
        return
    optimizer.mpu = _AnswersTensorParallel(mpu)
    try:
        yield
    finally:
        optimizer.mpu = mpu


class _AnswersTensorParallel:
    """``mpu`` with the tensor-parallel queries answered by its model-parallel ones."""

    def __init__(self, mpu: Any) -> None:
        self._mpu = mpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mpu, name)

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._mpu.get_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._mpu.get_model_parallel_rank()


# ------------------------------------------------------------------------------ restoring


class Resume(ABC):
    """A checkpoint to resume from: its state at once, its files when fetched."""

    def __init__(self, name: str, state: dict[str, Any]) -> None:
        self.name, self.state = name, state

    @abstractmethod
    def fetch(self, wanted: Callable[[str], bool] | None = None) -> Path:
        """A local folder holding the checkpoint's files that ``wanted`` accepts (relative
        paths; None: all of them)."""


class LocalResume(Resume):
    """A checkpoint on this machine's file system (local or shared): used in place."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), json.loads((path / STATE_FILE).read_text()))
        self.path = path

    def fetch(self, wanted: Callable[[str], bool] | None = None) -> Path:
        return self.path


class RemoteResume(Resume):
    """A checkpoint on a pyarrow file system (object storage): files are copied on demand into
    ``workdir``."""

    def __init__(self, fs: Any, path: str, workdir: Path) -> None:
        import pyarrow.fs as pafs

        self.fs, self.path, self.workdir = fs, path.rstrip("/"), workdir
        infos = fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        self.files = [i.path[len(self.path) + 1:] for i in infos if i.type == pafs.FileType.File]
        with fs.open_input_stream(f"{self.path}/{STATE_FILE}") as f:
            super().__init__(self.path, json.loads(f.read()))

    def fetch(self, wanted: Callable[[str], bool] | None = None) -> Path:
        for rel in self.files:
            target = self.workdir / rel
            if (wanted is None or wanted(rel)) and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(f"{self.path}/{rel}") as src, \
                        open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 * 2**20)
        return self.workdir


def rank_files(rank: int) -> Callable[[str], bool]:
    """The files of a checkpoint that rank ``rank`` needs when the world size is unchanged."""

    def wanted(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if rel in (STATE_FILE, f"rng/rank_{rank}.pt"):
            return True
        return rel.startswith(f"{DS_TAG}/") and (name.startswith("mp_rank_")
                                                 or f"zero_pp_rank_{rank}_" in name)

    return wanted


def check_global_batch(state: dict[str, Any], tc: TrainSection, world: int) -> None:
    """A resumed run must take the same units per step as the run that wrote the checkpoint:
    data-parallel size (workers / sequence_parallel_size) x micro-batch x accumulation, or
    the same ``rows_per_step`` (then any worker count will do). The sequence-parallel size
    itself may change (ZeRO partitions over every rank either way). A LoRA checkpoint holds
    only adapters: it resumes a LoRA run, and a full one only a full one."""
    if bool(state.get("lora", False)) != (tc.lora is not None):
        was = "LoRA adapters" if state.get("lora") else "every weight (no train.lora)"
        raise ValueError(f"train.lora: the checkpoint was written by a run training {was}; "
                         "resume it with the same setting, or start a new run")
    old_rows = state.get("rows_per_step")
    if old_rows is not None or tc.rows_per_step is not None:
        if old_rows != tc.rows_per_step:
            raise ValueError(f"train.rows_per_step: the checkpoint was written with "
                             f"{old_rows}, this run has {tc.rows_per_step}; resume with the "
                             "same step size")
        return
    old_dp = int(state["world_size"]) // int(state.get("sequence_parallel_size", 1))
    old = old_dp * int(state.get("micro_batch_size", tc.micro_batch_size)) * int(
        state.get("grad_accum", tc.grad_accum))
    dp = world // tc.sequence_parallel_size
    new = dp * tc.micro_batch_size * tc.grad_accum
    if old != new:
        raise ValueError(
            f"train.grad_accum: the checkpoint was written with a global batch of {old} units "
            f"per step ({old_dp} data-parallel workers x micro_batch_size x grad_accum), this "
            f"run has {new} ({dp} x {tc.micro_batch_size} x {tc.grad_accum}); to resume on "
            f"{world} workers set grad_accum so that the product stays {old}")


def restore(engine: Any, resume: Resume, rank: int, local_rank: int, world: int,
            strict: bool = True) -> dict[str, Any]:
    """Load ``resume`` into ``engine`` (built with ``load_universal`` exactly when the world
    size changed); the client state. ``strict``: as ``load``'s."""
    import torch.distributed as dist

    if int(resume.state["world_size"]) == world:
        return load(engine, resume.fetch(rank_files(rank)), rank, strict)
    key = hashlib.sha256(resume.name.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"palign-universal-{key}"
    if local_rank == 0:  # one conversion per node
        shutil.rmtree(folder, ignore_errors=True)
        to_universal(resume.fetch(None), folder,
                     int(resume.state.get("sequence_parallel_size", 1)))
    dist.barrier()
    try:
        return load(engine, folder, rank, strict)
    finally:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


def to_universal(source: Path, target: Path, sequence_parallel_size: int = 1) -> None:
    """Convert the checkpoint in ``source`` into a universal one in ``target`` (same layout:
    ``ds/`` then the state and RNG files).

    A sequence-parallel run's model states record its sequence-parallel size as the tensor-
    parallel degree (DeepSpeed's Ulysses groups answer the model-parallel queries), which the
    converter then looks for as that many model-state files. Its ranks hold whole parameters,
    ZeRO-partitioned over all of them as in a plain data-parallel run, so the conversion reads
    a view of the checkpoint (links to its ZeRO shards, model states saying tensor-parallel 1)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as convert

    view = None
    if sequence_parallel_size > 1:
        view = target.with_name(target.name + "-source")
        _data_parallel_view(source / DS_TAG, view / DS_TAG)
    # inject_missing_state: the converter adds the universal-checkpoint version it wants from
    # the client's saved state (palign saves none)
    args = argparse.Namespace(input_folder=str((view or source) / DS_TAG),
                              output_folder=str(target / DS_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    chatter = io.StringIO()  # the converter prints its progress
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            convert(args)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    shutil.copy(source / STATE_FILE, target / STATE_FILE)
    if (source / "rng").is_dir():
        shutil.copytree(source / "rng", target / "rng")
    logger.info("converted checkpoint %s to a universal one for a new world size", source)


def _data_parallel_view(ds: Path, view: Path) -> None:
    """``view``: links to the files of the DeepSpeed folder ``ds``, except its model states,
    rewritten with a tensor-parallel degree of 1."""
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE

    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for path in ds.iterdir():
        if path.name.startswith("mp_rank_") and path.name.endswith("_model_states.pt"):
            states = load_tensors(path, map_location="cpu", mmap=True)
            states.setdefault(CHECKPOINT_PARALLEL_DIMS, {})[CHECKPOINT_TP_DEGREE] = 1
            torch.save(states, view / path.name)
        else:
            (view / path.name).symlink_to(path.absolute())
