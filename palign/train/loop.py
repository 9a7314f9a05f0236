"""The per-worker SFT loop: one function that every training process runs.

``train_worker(cfg_raw)`` runs under Ray Train (``palign.train.trainer.run_train`` starts it in
``train.num_workers`` Ray actors; rank and world size from ``ray.train.get_context()``) and
equally under ``torchrun`` without Ray::

    torchrun --nproc-per-node N -m palign.train.loop CONFIG.yaml

(rank, world size and the rendezvous from torchrun's environment; then nothing calls
``ray.train``: checkpoints are written straight to disk and metrics are logged).

What one worker does:

1. Loads the tokenizer and the student (``models.student`` through ``palign.models.resolve_model``;
   dtype ``train.dtype``, where ``auto`` means bf16 on GPU and fp32 on CPU; attention
   implementation and gradient checkpointing from the config).
2. Opens the prepared units (``palign.train.prepare``: the align stage's rows tokenised with
   ``example_from_row``'s masks and packed into rows of ``seq_len`` tokens, or with ``packing:
   false`` one right-padded example per unit, once, before the workers start; under torchrun
   rank 0 prepares them in process). A rank reads only its own micro-batches' units and the
   parts of the unit table that list them, by ranged reads, from any storage.
3. Plans the steps (``palign.train.steps.StepPlan``): each epoch is a pseudo-random permutation
   of the units (packs or examples) keyed by ``(train.seed, epoch)`` and computed position by
   position; one optimizer step takes ``world x micro_batch_size x grad_accum`` consecutive
   positions of it, rank ``r``'s micro-batch ``m`` being the slice at
   ``(m * world + r) * micro_batch_size``. The last step of an epoch is completed by repeating
   units from the start of that epoch's order, so every rank runs the same number of
   micro-batches and every unit is seen at least once per epoch (nothing is dropped).
   ``max_steps`` caps the total (and the learning-rate schedule is laid over the capped total).
4. Wraps the model in DeepSpeed (ZeRO stage ``train.zero_stage``; a torch ``AdamW`` as client
   optimizer, betas (0.9, 0.95), no weight decay on norms and biases; linear warm-up then cosine
   decay to ``lr * min_lr_ratio`` as client scheduler; bf16 mixed precision, with fp32 master
   weights, exactly when the model is loaded in bf16). The loss is computed inside the engine's
   forward (``LossModule``), with ``token_loss_sum``'s chunked LM head (``loss_chunk_size``
   rows per call at most), which makes the same number of head calls on every rank whatever
   the labels, as ZeRO-3's parameter gathers need (see ``LossModule``).
5. Loss normalisation: the loss of a step is the mean over every supervised token of the global
   batch (all micro-batches of all ranks), as one large batch would give. Each rank reads its
   micro-batches of the step first and counts their supervised and real tokens; one all-reduce
   of those two numbers gives the step's global token count ``T``. A micro-batch
   back-propagates ``token_loss_sum * world * grad_accum / T``, which DeepSpeed divides by
   ``grad_accum`` (``engine.backward``) and averages over ranks (ZeRO's gradient reduction):
   the gradient is that of ``sum(all token losses) / T``. The reported ``loss`` is the same
   quantity (a second all-reduce, of the loss sums).
6. Every ``report_every`` steps reports loss, lr, grad_norm, tokens_per_s (real, non-padding input
   tokens of all ranks per second), epoch, step and packing_efficiency. Every
   ``checkpoint_every`` steps and at the end, every rank writes its DeepSpeed shards
   (``engine.save_checkpoint`` with ``client_state`` = step, epoch, position in the epoch and
   the loss history; plus ``rng/rank_<r>.pt`` with that rank's python, numpy and torch RNG
   states) into a fresh directory reported as one ``ray.train.Checkpoint`` (Ray merges the
   ranks' files into ``<storage_path>/<run.name>-train/checkpoint_<step>/``; ZeRO-3 shards stay
   sharded). Under torchrun the same layout is written in place, and a ``train_state.json``
   written by rank 0 after a barrier marks a checkpoint as complete.
7. On start, the checkpoint from ``ray.train.get_checkpoint()`` (under torchrun: the newest
   complete one on disk) restores weights, optimizer, scheduler, RNG states and the data
   position, and training continues with the next step; since the data order is a function of
   (seed, epoch, step) the resumed run computes exactly what an uninterrupted run would.
   Resuming needs the same ``num_workers`` (ZeRO shards are per rank).
8. At the end, exports the full weights (``palign.train.export.export_model``) to
   ``<output_dir>/train/model/``; the final report carries the loss history and a summary.

DeepSpeed on CPU: the only C++ op DeepSpeed would build here is its shared-memory comm op,
compiled on the first ``init_distributed`` and used only by ``inference_all_reduce`` (tensor-
parallel inference), never by training. ``_skip_cpu_shm_comm`` marks it incompatible
(``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False``), so nothing is compiled and
no C++ compiler is needed; ``PALIGN_DS_SHM_COMM=1`` keeps DeepSpeed's default. No Adam op is
built either: the optimizer is torch's AdamW.

Fault injection for tests: with ``PALIGN_TRAIN_FAIL_AT_STEP=N`` in the workers' environment every
rank raises right after step N (and its checkpoint, if any), but only in a run that started
from scratch (a resumed one goes through).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palign import storage, telemetry
from palign.config import Config, TrainSection, parse_config
from palign.engines.hf_engine import resolve_dtype as resolve_dtype_name
from palign.logs import quiet_console
from palign.stages.io import replace_atomically
from palign.train.data import IGNORE_INDEX, Pack, collate_packs, pad_batch, token_loss_sum
from palign.train.prepare import UnitReader, prepare
from palign.train.steps import StepPlan

logger = logging.getLogger("palign.train.loop")  # also when run as __main__

ENV_FAIL_AT_STEP = "PALIGN_TRAIN_FAIL_AT_STEP"
ENV_SHM_COMM = "PALIGN_DS_SHM_COMM"
DS_TAG = "ds"  # DeepSpeed's checkpoint tag (sub-folder) inside each checkpoint directory
STATE_FILE = "train_state.json"  # written by rank 0; marks a torchrun checkpoint complete
CHECKPOINT_PREFIX = "checkpoint_"
DATA_KEY = "_train_data"  # in the workers' config dict under Ray: the prepared units' folder


# ------------------------------------------------------------------------------ paths


def run_dir(cfg: Config) -> Path:
    """``<storage_path>/<run.name>-train`` as a local path: torchrun's checkpoints (under Ray,
    Ray Train keeps the run's folder on any storage)."""
    root = storage_path(cfg)
    if storage.is_uri(root):
        raise ValueError(f"train.storage_path: {root}: torchrun checkpoints need a path on the "
                         "machine; object storage works under Ray Train")
    return Path(root) / run_name(cfg)


def run_name(cfg: Config) -> str:
    return f"{cfg.run.name}-train"


def storage_path(cfg: Config) -> str:
    """Ray Train storage: ``train.storage_path``, default ``<output_dir>/train/ray``: an
    absolute path or a URI (Ray Train writes checkpoints to object storage itself)."""
    return storage.absolute(cfg.train.storage_path or storage.join(cfg.stage_dir("train"), "ray"))


def model_dir(cfg: Config) -> str:
    """Where the trained model is exported: ``<output_dir>/train/model`` (a path or a URI)."""
    return storage.join(storage.absolute(cfg.stage_dir("train")), "model")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# ------------------------------------------------------------------------------ data


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Any:
    """Linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to ``min_lr_ratio``.

    The factor for optimizer step ``i`` (0-based) is ``f(i)``.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    under_ray: bool
    device: torch.device


def _ray_train_context() -> Any | None:
    try:
        import ray.train
    except ImportError:
        return None
    try:
        return ray.train.get_context()
    except RuntimeError:  # not inside a Ray Train worker
        return None


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory comm op (unused by training)."""
    if os.environ.get(ENV_SHM_COMM) == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed(tc: TrainSection) -> DistInfo:
    """Rank, world and device from Ray Train or torchrun; torch.distributed and DeepSpeed comm."""
    import deepspeed
    import torch.distributed as dist

    ctx = _ray_train_context()
    if ctx is not None:
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    else:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    use_cuda = tc.use_gpu and torch.cuda.is_available()
    if tc.use_gpu and not use_cuda:
        raise RuntimeError("train.use_gpu is set but this worker sees no CUDA device")
    if use_cuda:
        if ctx is not None:
            import ray.train.torch

            device = ray.train.torch.get_device()
        else:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
        _skip_cpu_shm_comm()
    if not dist.is_initialized():  # Ray Train has already made the process group
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    else:
        deepspeed.init_distributed()
    return DistInfo(rank, world, local, ctx is not None, device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ model


def resolve_dtype(tc: TrainSection, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_dtype_name(tc.dtype, on_gpu=bf16_gpu)


def load_student(cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """Tokenizer and model of ``models.student`` (resolved to a local folder or a hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palign.models import resolve_model

    path = resolve_model(cfg.models.student, cfg.models.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=cfg.train.attn_implementation
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return tokenizer, model


class LossModule(torch.nn.Module):
    """What DeepSpeed wraps: the causal LM, whose forward returns the summed token loss.

    Calling the loss through ``engine(...)`` keeps DeepSpeed's forward bookkeeping (ZeRO-3
    parameter fetching, backward hooks) while ``token_loss_sum`` gets the bare model it needs for
    its chunked path. Packed batches are run with ``use_cache=False`` by ``token_loss_sum``.

    Under ZeRO-3 every call of the LM head gathers its sharded weight with a collective, so all
    ranks must call it equally often, although their micro-batches hold different numbers of
    supervised tokens (and, unpacked, different widths). ``positions`` (``micro_batch x
    seq_len``, the same on every rank) fixes ``token_loss_sum``'s chunk count at
    ``ceil(positions / chunk_size)`` head calls forward and as many in the backward
    recomputation, on every rank, with at most ``chunk_size`` rows of fp32 logits at a time.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int | None,
                 positions: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.positions = positions

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = token_loss_sum(self.model, batch, self.chunk_size, self.positions)
        return loss_sum


def deepspeed_config(tc: TrainSection, world: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config the engine is built with (batch sizes, clipping, ZeRO, precision)."""
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer with ZeRO
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: torch.nn.Module, world: int, total_steps: int) -> Any:
    """``deepspeed.initialize`` with torch AdamW and the warm-up + cosine ``LambdaLR``."""
    import deepspeed

    tc = cfg.train
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    module = LossModule(model, tc.loss_chunk_size, tc.micro_batch_size * tc.seq_len)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, tc.warmup_ratio, tc.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(tc, world, bf16),
    )
    return engine


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(engine: Any, directory: Path, dist_info: DistInfo,
                    client_state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shards and RNG state into ``directory``."""
    import torch.distributed as dist

    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=client_state)
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), directory / "rng" / f"rank_{dist_info.rank}.pt")
    dist.barrier()
    if dist_info.rank == 0:
        state = {k: v for k, v in client_state.items() if k != "losses"}
        replace_atomically(directory / STATE_FILE, json.dumps(state, indent=1).encode())


def load_checkpoint(engine: Any, directory: Path, dist_info: DistInfo) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the client state."""
    load_path, client_state = engine.load_checkpoint(
        str(directory), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    rng_file = directory / "rng" / f"rank_{dist_info.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("no RNG state for rank %d in %s", dist_info.rank, directory)
    return dict(client_state)


def latest_local_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (with ``train_state.json``) under ``root``, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir()
            if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def _prune_local(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir()
                  if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ the loop


@dataclass
class _Progress:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # real tokens trained on by this process's run (all ranks)
    seconds: float = 0.0


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _collate(data: UnitReader, idx: list[int]) -> tuple[dict[str, torch.Tensor], int, int]:
    """This rank's micro-batch (only its own units are read), its supervised (loss) tokens and
    its real (non-padding) input tokens."""
    units = [data.unit(i) for i in idx]
    if isinstance(units[0], Pack):
        batch = collate_packs(units)  # type: ignore[arg-type]
        real = sum(u.n_real for u in units)  # type: ignore[union-attr]
    else:
        batch = pad_batch(units, data.prepared.pad_id)  # type: ignore[arg-type]
        real = sum(len(u) for u in units)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return batch, supervised, real


def _report(dist_info: DistInfo, metrics: dict[str, Any], ckpt_dir: Path | None,
            step: int) -> None:
    if dist_info.rank == 0:  # one line per step, from one rank; the metrics go to Ray Train
        logger.info("train step %d/%s: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s",
                    step, metrics.get("total_steps", "?"), metrics.get("loss", float("nan")),
                    metrics.get("lr", float("nan")), metrics.get("grad_norm") or float("nan"),
                    metrics.get("tokens_per_s", 0.0))
        # Prometheus gauges through Ray's metrics agent; a no-op under torchrun (no Ray).
        telemetry.train_step(metrics.get("loss"), metrics.get("tokens_per_s"))
    if not dist_info.under_ray:
        return
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
    ray.train.report(metrics, checkpoint=checkpoint,
                     checkpoint_dir_name=checkpoint_name(step) if ckpt_dir else None)


@contextlib.contextmanager
def resume_checkpoint(cfg: Config, dist_info: DistInfo) -> Iterator[Path | None]:
    """The directory of the checkpoint to resume from, or None for a fresh start.

    Under Ray: ``ray.train.get_checkpoint()`` (Ray Train V2 restores the run's latest reported
    checkpoint when a worker group restarts after a failure, and when a run is started again
    with the same storage path and name); a local storage path is used in place, remote storage
    is downloaded for the duration of the ``with``. Under torchrun: the newest complete
    checkpoint in ``run_dir(cfg)`` as rank 0 sees it.
    """
    if dist_info.under_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)
        return
    import torch.distributed as dist

    # Rank 0 decides, so that every rank loads the same one (the folder must be shared storage
    # when the ranks run on several nodes).
    choice = [latest_local_checkpoint(run_dir(cfg)) if dist_info.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    yield choice[0]


def train_worker(cfg_raw: dict[str, Any]) -> None:
    """Train the student on the aligned rows; run by every worker (Ray Train or torchrun).

    ``cfg_raw`` is ``Config.model_dump(mode="json")``; paths in it should be absolute (Ray
    workers do not share the driver's working directory; ``run_train`` makes them so). Under
    Ray it also holds ``DATA_KEY``, the prepared units' folder (``palign.train.prepare``);
    without it (torchrun) rank 0 prepares them in process first.
    """
    cfg_raw = dict(cfg_raw)
    data_folder = cfg_raw.pop(DATA_KEY, None)
    cfg = parse_config(cfg_raw)
    tc = cfg.train
    _setup_logging()
    dist_info = setup_distributed(tc)
    _seed_all(tc.seed)
    dtype = resolve_dtype(tc, dist_info.device)
    if data_folder is None:
        data_folder = _prepare_here(cfg, dist_info)
    tokenizer, model = load_student(cfg, dtype)
    data = UnitReader(data_folder)
    if dist_info.rank == 0:
        p = data.prepared
        logger.info("train data: %d rows used, %d rejected, %d units, packing efficiency %.3f",
                    p.rows_used, p.rows_rejected, p.n_units, p.packing_efficiency)
    plan = StepPlan(len(data), dist_info.world, tc.micro_batch_size, tc.grad_accum,
                    tc.epochs, tc.max_steps, tc.seed)
    engine = build_engine(cfg, model, dist_info.world, plan.total_steps)

    progress = _Progress()
    start = 0
    with resume_checkpoint(cfg, dist_info) as ckpt_dir:
        if ckpt_dir is not None:
            written = json.loads((ckpt_dir / STATE_FILE).read_text())
            if written.get("world_size") != dist_info.world:
                raise RuntimeError(f"checkpoint {ckpt_dir} was written by "
                                   f"{written.get('world_size')} workers, this run has "
                                   f"{dist_info.world}: resume with the same num_workers")
            state = load_checkpoint(engine, ckpt_dir, dist_info)
            start = int(state["step"])
            progress.losses = [float(x) for x in state.get("losses", [])][:start]
            if state.get("data_fingerprint") != data.prepared.key:
                logger.warning("the aligned data differ from those of checkpoint %s: the "
                               "resumed run will not reproduce an uninterrupted one", ckpt_dir)
            if dist_info.rank == 0:
                logger.info("resumed from %s after step %d", ckpt_dir, start)
    _run_steps(cfg, engine, data, plan, dist_info, start, progress, tokenizer)


def _prepare_here(cfg: Config, dist_info: DistInfo) -> str:
    """torchrun: rank 0 prepares the units in process (the others wait), every rank gets the
    folder."""
    import torch.distributed as dist

    folder = [prepare(cfg, use_ray=False).folder if dist_info.rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    return str(folder[0])


def _run_steps(cfg: Config, engine: Any, data: UnitReader, plan: StepPlan, dist_info: DistInfo,
               start: int, progress: _Progress, tokenizer: Any) -> None:
    import torch.distributed as dist

    from palign.train.export import export_model

    tc = cfg.train
    total = plan.total_steps
    fail_at = int(os.environ.get(ENV_FAIL_AT_STEP, "0") or 0)
    prepared = data.prepared
    base = {"packing_efficiency": prepared.packing_efficiency, "rows_used": prepared.rows_used,
            "rows_rejected": prepared.rows_rejected, "total_steps": total,
            "resumed_from": start}
    if dist_info.rank == 0 and start == 0:
        logger.info("training %d steps (%d per epoch, %d units per step, world %d)", total,
                    plan.steps_per_epoch, plan.per_step, dist_info.world)
    metrics: dict[str, Any] = {}
    for step in range(start, total):
        epoch = plan.epoch_of(step)
        t0 = time.perf_counter()
        micro = [_collate(data, idx) for idx in plan.micro_batches(step, dist_info.rank)]
        # The step's global supervised and real token counts: each rank knows only its own.
        counts = torch.tensor([sum(m[1] for m in micro), sum(m[2] for m in micro)],
                              dtype=torch.float64)
        dist.all_reduce(counts)
        global_tokens = int(counts[0])
        scale = dist_info.world * tc.grad_accum / max(1, global_tokens)
        lr = float(engine.get_lr()[0])
        local_loss = torch.zeros(1, dtype=torch.float64)
        for batch, _, _ in micro:
            loss_sum = engine(**_to_device(batch, dist_info.device))
            engine.backward(loss_sum * scale)
            engine.step()
            local_loss[0] += float(loss_sum.detach())
        dist.all_reduce(local_loss)
        seconds = time.perf_counter() - t0
        loss = float(local_loss[0]) / max(1, global_tokens)
        done = step + 1
        progress.losses.append(loss)
        progress.tokens += int(counts[1])
        progress.seconds += seconds
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            **base, "step": done, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": float(counts[1]) / seconds if seconds > 0 else 0.0,
        }
        is_last = done == total
        ckpt_now = is_last or done % tc.checkpoint_every == 0
        if ckpt_now:
            client_state = {
                "step": done, "epoch": epoch, "step_in_epoch": done - epoch * plan.steps_per_epoch,
                "micro_batches_per_rank": done * tc.grad_accum, "world_size": dist_info.world,
                "data_fingerprint": prepared.key, "losses": list(progress.losses),
            }
            local = _checkpoint_target(cfg, dist_info, done)
            save_checkpoint(engine, local, dist_info, client_state)
            if is_last:
                metrics.update(_finish(cfg, engine, tokenizer, dist_info, progress))
            try:
                _report(dist_info, metrics, local, done)
            finally:
                if dist_info.under_ray:
                    shutil.rmtree(local, ignore_errors=True)
                elif dist_info.rank == 0:
                    _prune_local(run_dir(cfg), tc.keep_checkpoints)
        elif done % tc.report_every == 0:
            _report(dist_info, metrics, None, done)
        if fail_at and done == fail_at and start == 0:
            raise RuntimeError(f"{ENV_FAIL_AT_STEP}={fail_at}: injected failure after step {done}")
    if start >= total:  # a finished run started again: only make sure the model is exported
        if dist_info.rank == 0:
            logger.info("run already complete (%d steps); exporting the model", total)
        out = model_dir(cfg)
        if not storage.is_file(storage.join(out, "config.json")):
            export_model(engine.module.model, tokenizer, out, dist_info.rank)


def _checkpoint_target(cfg: Config, dist_info: DistInfo, step: int) -> Path:
    if dist_info.under_ray:  # a fresh local folder per rank; Ray merges them in storage
        return Path(tempfile.mkdtemp(prefix=f"palign-{checkpoint_name(step)}-"))
    return run_dir(cfg) / checkpoint_name(step)


def _finish(cfg: Config, engine: Any, tokenizer: Any, dist_info: DistInfo,
            progress: _Progress) -> dict[str, Any]:
    from palign.train.export import export_model

    out = model_dir(cfg)
    export_model(engine.module.model, tokenizer, out, dist_info.rank,
                 extra={"train": cfg.train.model_dump(mode="json"),
                        "steps": len(progress.losses),
                        "final_loss": progress.losses[-1] if progress.losses else None})
    summary = {
        "done": True,
        "losses": list(progress.losses),
        "final_loss": progress.losses[-1] if progress.losses else None,
        "run_tokens_per_s": progress.tokens / progress.seconds if progress.seconds else 0.0,
        "model_dir": str(out),
    }
    if dist_info.rank == 0:
        storage.write_text(storage.join(storage.absolute(cfg.stage_dir("train")), "summary.json"),
                           json.dumps(summary, indent=1))
    return summary


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("palign").setLevel(logging.INFO)
    quiet_console()  # e.g. Ray Train's "Reporting training result" line, per rank and step
    # Said once per rank and about DeepSpeed's own calls into torch, not about this run.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m palign.train.loop CONFIG`` (under torchrun): one worker of a torchrun job."""
    from palign.config import load_config

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m palign.train.loop",
        description="One worker of a torchrun SFT job (no Ray): trains on <output_dir>/align.")
    parser.add_argument("config", help="the run's YAML config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    raw = cfg.model_dump(mode="json")
    raw["run"]["output_dir"] = str(Path(cfg.run.output_dir).absolute())
    train_worker(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
