"""The per-worker SFT loop: one function that every training process runs.

``train_worker(cfg_raw)`` runs under Ray Train (``palign.train.trainer.run_train`` starts it in
``train.num_workers`` Ray actors) and equally under ``torchrun`` without Ray::

    torchrun --nproc-per-node N -m palign.train.loop CONFIG.yaml

The parts, one job each (none of them imports Ray but ``ray_backend``):

- ``backend``: where this process runs (``RayBackend`` or ``TorchrunBackend``: rank, device,
  where checkpoints and metrics go), and torch.distributed set up;
- ``model``: the student in its dtype with document-aware attention (``attention``), and the
  ``LossModule`` DeepSpeed wraps;
- ``engine``: the DeepSpeed engine, the (fused) AdamW and the learning-rate schedule;
- ``steps``: the step plan: which units each rank's micro-batches hold at each step (or, with
  ``train.rows_per_step``, which rows each step takes), and ``batches``: those micro-batches
  read and collated for this rank;
- ``lora``: LoRA adapters with ``train.lora`` (applied by ``model``), and their export;
- ``checkpoints``: what a checkpoint holds, saved and restored;
- ``progress``: the run's tally and its step lines; ``callbacks``: what ``train.callbacks``
  names, called after each step;
- this module: the steps themselves.

What one worker does:

1. Loads the tokenizer and the student (``palign.train.model``; with ``train.lora``, PEFT's model
   with the base frozen) and logs its trainable and total parameters.
2. Opens the prepared units (``palign.train.prepare``: the align stage's rows tokenised with
   ``example_from_row``'s masks and packed into rows of ``seq_len`` tokens, or with ``packing:
   false`` one right-padded example per unit, once, before the workers start; under torchrun
   rank 0 prepares them in process). A rank reads only its own micro-batches' units and the
   parts of the unit table that list them, by ranged reads, from any storage.
3. Plans the steps (``palign.train.steps.StepPlan``): each epoch a seeded permutation of the
   units; rank ``r``'s micro-batch ``m`` of a step is a fixed slice of it; the last step of an
   epoch wraps, so no unit is dropped; ``max_steps`` caps the total. With
   ``train.rows_per_step`` (``RowPlan``) a step is that many rows of the epoch's order (the last
   one the rest), packed into bins per step and dealt to the ranks (``palign.train.batches``).
4. Builds the DeepSpeed engine (``palign.train.engine``).
5. Runs the steps (``train_step``). The loss of a step is the mean over every supervised token
   of the global batch (all micro-batches of all ranks), as one large batch would give. Each
   rank reads its micro-batches of the step first and counts their supervised and real tokens;
   one all-reduce of those numbers gives the step's global token count ``T``. A micro-batch
   back-propagates ``token_loss_sum * dp_world / T`` (DeepSpeed told not to rescale it for
   accumulation; the step's last micro-batch is the accumulation boundary), which DeepSpeed
   averages over the ``dp_world`` data-parallel ranks (under sequence parallelism the slices of
   a row add up): the gradient is that of ``sum(all token losses) / T``. The reported ``loss``
   is the same quantity (a second all-reduce, of the loss sums).
6. Every ``report_every`` steps publishes loss, lr, grad_norm, tokens_per_s (real, non-padding
   input tokens of all ranks per second), the step's rows and tokens, epoch, step,
   packing_efficiency and the parameter counts; rank 0 also sends every step's numbers to the
   dashboards of ``train.report_to`` (``palign.train.trackers``). Every ``checkpoint_every``
   steps and at the end, saves a checkpoint (``palign.train.checkpoints``; a LoRA run's holds
   no frozen weight) and publishes it with the metrics. Then every rank calls ``train.callbacks``
   (``palign.train.callbacks``): one that raises fails the run after that step.
7. On start, the backend's checkpoint to resume from restores weights, optimizer, scheduler, RNG
   states and the data position, and training continues with the next step; since the data
   order is a function of (seed, epoch, step) the resumed run computes exactly what an
   uninterrupted run would. On another number of workers (same global batch) the checkpoint is
   converted to a DeepSpeed universal checkpoint first (``palign.train.checkpoints``).
8. At the end, exports the full weights (``palign.train.export.export_model``) to
   ``<output_dir>/train/model/``; a LoRA run writes its adapter to ``<output_dir>/train/adapter/``
   and the base with the adapter merged to ``train/model/`` (``palign.train.lora``). The final
   report carries the loss and rows history and a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from palign.config import Config, parse_config
from palign.config.paths import absolute_paths
from palign.data import storage
from palign.data.fingerprint import ConfigChanged
from palign.train import callbacks, checkpoints
from palign.train.backend import Backend, start
from palign.train.batches import MicroBatch, StepSource
from palign.train.engine import deepspeed_engine, gradient_divisor, optimizer_elements
from palign.train.identity import guard_resume
from palign.train.lora import parameter_counts
from palign.train.model import load_student, sequence_parallel, train_dtype
from palign.train.paths import DATA_KEY
from palign.train.prepare import prepare
from palign.train.progress import Progress, log_step, setup_logging
from palign.train.trackers import Trackers, open_trackers
from palign.train.units import UnitReader

logger = logging.getLogger("palign.train.loop")  # also when run as __main__


@dataclass
class StepResult:
    loss: float  # mean over the global batch's supervised tokens
    supervised: int  # all ranks
    real: int  # all ranks
    lr: float  # the learning rate the step used
    rows: int = 0  # all ranks


def train_step(engine: Any, micro: Sequence[MicroBatch], divisor: int,
               device: torch.device) -> StepResult:
    """One optimizer step over this rank's micro-batches (every rank calls it with its own,
    all ranks with as many): the loss normalised by the global batch's supervised tokens.
    ``divisor``: the number of ranks DeepSpeed divides the summed gradients by
    (``engine.gradient_divisor``: the data-parallel size, as the ranks of a sequence-parallel
    group hold slices of the same rows and their gradients add up; every rank under ZeRO-3
    with sequence parallelism). The step's last micro-batch is the accumulation boundary
    (set here, whatever DeepSpeed's ``gradient_accumulation_steps``: a ``rows_per_step``
    step's number of micro-batches varies), and DeepSpeed does not rescale the loss for
    accumulation (the scale here already makes the step's gradient the token mean)."""
    import torch.distributed as dist

    counts = torch.tensor([sum(m.supervised for m in micro), sum(m.real for m in micro),
                           sum(m.rows for m in micro)], dtype=torch.float64)
    dist.all_reduce(counts)
    global_tokens = int(counts[0])
    scale = divisor / max(1, global_tokens)
    lr = float(engine.get_lr()[0])
    local_loss = torch.zeros(1, dtype=torch.float64)
    for i, m in enumerate(micro):
        engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
        loss_sum = engine(**{k: v.to(device, non_blocking=True) for k, v in m.batch.items()})
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        engine.step()
        local_loss[0] += float(loss_sum.detach())
    dist.all_reduce(local_loss)
    return StepResult(float(local_loss[0]) / max(1, global_tokens), global_tokens,
                      int(counts[1]), lr, int(counts[2]))


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
    setup_logging()
    hooks = callbacks.load(tc)  # a callback that cannot be made fails here, before any work
    if data_folder is not None:  # the Ray trainer put the prepared data there: a Ray Train worker
        from palign.train.ray_backend import ray_train_backend

        backend = start(tc, ray_train_backend(tc))
    else:
        backend = start(tc)
    checkpoints.seed_all(tc.seed)
    if data_folder is None:
        data_folder = _prepare_here(cfg, backend)
    tokenizer, model = load_student(cfg, train_dtype(tc, backend.device), backend.device,
                                    backend.world)
    mpu = sequence_parallel(tc, model)
    data = UnitReader(data_folder)
    trainable, total_params = parameter_counts(model)
    if backend.rank == 0:
        p = data.prepared
        logger.info("train data: %d rows used, %d rejected, %d units, packing efficiency %.3f",
                    p.rows_used, p.rows_rejected, p.n_units, p.packing_efficiency)
        logger.info("parameters: %s trainable of %s (%.2f%%)%s", f"{trainable:,}",
                    f"{total_params:,}", 100 * trainable / max(1, total_params),
                    f", LoRA r {tc.lora.r} on {tc.lora.target_modules}" if tc.lora else "")
    sp = tc.sequence_parallel_size
    # data-parallel size: the ranks of a sequence-parallel group share their micro-batches
    source = StepSource(tc, data, backend.world // sp, backend.rank // sp, backend.rank % sp)
    plan = source.plan
    if backend.rank == 0 and sp > 1:
        logger.info("sequence parallel: %d groups of %d ranks, each row split %d ways",
                    backend.world // sp, sp, sp)

    progress = Progress(params={"trainable_params": trainable, "total_params": total_params})
    start_step = 0
    with backend.resume(cfg) as resume:
        elastic = resume is not None and int(resume.state["world_size"]) != backend.world
        if resume is not None:
            checkpoints.check_global_batch(resume.state, tc, backend.world)
        engine = deepspeed_engine(cfg, model, backend.world, plan.total_steps,
                                  load_universal=elastic, mpu=mpu)
        if resume is not None:
            state = checkpoints.restore(engine, resume, backend.rank, backend.local_rank,
                                        backend.world, strict=tc.lora is None)
            start_step = int(state["step"])
            progress.losses = [float(x) for x in state.get("losses", [])][:start_step]
            progress.rows = [int(x) for x in state.get("rows", [])][:start_step]
            if state.get("data_fingerprint") != data.prepared.key:
                logger.warning("the aligned data differ from those of checkpoint %s: the "
                               "resumed run will not reproduce an uninterrupted one",
                               resume.name)
            if backend.rank == 0:
                logger.info("resumed from %s after step %d%s", resume.name, start_step,
                            f" (written by {resume.state['world_size']} workers, now "
                            f"{backend.world})" if elastic else "")
    held = torch.tensor([optimizer_elements(engine)], dtype=torch.float64)
    torch.distributed.all_reduce(held)
    progress.params["optimizer_params"] = int(held[0])
    if backend.rank == 0:
        logger.info("the optimizer holds %s parameters over %d ranks", f"{int(held[0]):,}",
                    backend.world)
    trackers = open_trackers(cfg, backend.rank, start_step)  # rank 0's dashboards (report_to)
    try:
        _run_steps(cfg, engine, source, backend, start_step, progress, tokenizer, hooks, trackers)
    finally:
        trackers.close()


def _prepare_here(cfg: Config, backend: Backend) -> str:
    """torchrun: rank 0 prepares the units in process (the others wait), every rank gets the
    folder."""
    import torch.distributed as dist

    folder = [prepare(cfg, use_ray=False).folder if backend.rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    return str(folder[0])


def _run_steps(cfg: Config, engine: Any, source: StepSource, backend: Backend,
               start_step: int, progress: Progress, tokenizer: Any,
               hooks: Sequence[callbacks.StepCallback] = (),
               trackers: Trackers | None = None) -> None:
    tc = cfg.train
    trackers = trackers or Trackers()
    plan = source.plan
    total = plan.total_steps
    divisor = gradient_divisor(tc, backend.world)
    prepared = source.data.prepared
    base = {"packing_efficiency": prepared.packing_efficiency, "rows_used": prepared.rows_used,
            "rows_rejected": prepared.rows_rejected, "total_steps": total,
            "resumed_from": start_step, **progress.params}
    trackers.start(base)
    if backend.rank == 0 and start_step == 0:
        per_step = (f"{tc.rows_per_step} rows per step, packed per step" if source.by_rows
                    else f"{plan.per_step} units per step")  # type: ignore[union-attr]
        logger.info("training %d steps (%d per epoch, %s, world %d)", total,
                    plan.steps_per_epoch, per_step, backend.world)
    for step in range(start_step, total):
        epoch = plan.epoch_of(step)
        t0 = time.perf_counter()
        batches = source.step(step)
        result = train_step(engine, batches.micro, divisor, backend.device)
        seconds = time.perf_counter() - t0
        done = step + 1
        progress.losses.append(result.loss)
        progress.rows.append(result.rows)
        progress.tokens += result.real
        progress.seconds += seconds
        progress.slots += batches.bins * tc.seq_len
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            **base, "step": done, "epoch": epoch, "loss": result.loss, "lr": result.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": result.real / seconds if seconds > 0 else 0.0,
            "rows": result.rows, "tokens": result.real,
        }
        if source.by_rows and tc.packing and progress.slots:
            # what this run's steps filled of their bins (the prepared units are not packed)
            metrics["packing_efficiency"] = progress.tokens / progress.slots
        trackers.log(metrics, done)  # every step, whatever report_every
        short = batches.rows_planned is not None and batches.rows_planned < (tc.rows_per_step or 0)
        is_last = done == total
        if is_last or done % tc.checkpoint_every == 0:
            client_state = {
                "step": done, "epoch": epoch, "step_in_epoch": done - epoch * plan.steps_per_epoch,
                "world_size": backend.world, "micro_batch_size": tc.micro_batch_size,
                "grad_accum": tc.grad_accum, "rows_per_step": tc.rows_per_step,
                "sequence_parallel_size": tc.sequence_parallel_size, "lora": tc.lora is not None,
                "data_fingerprint": prepared.key, "losses": list(progress.losses),
                "rows": list(progress.rows),
            }
            local = backend.checkpoint_dir(cfg, done)
            checkpoints.save(engine, local, backend.rank, client_state,
                             adapters_only=tc.lora is not None)
            if is_last:
                metrics.update(_finish(cfg, engine, tokenizer, backend, progress,
                                       (prepared.rows_used, prepared.rows_rejected)))
                trackers.finish(cfg.trained_model_dir())
            log_step(backend.rank, metrics, done, short)
            try:
                backend.publish(cfg, metrics, local, done)
            finally:
                backend.after_checkpoint(cfg, local)
        elif done % tc.report_every == 0:
            log_step(backend.rank, metrics, done, short)
            backend.publish(cfg, metrics, None, done)
        for hook in hooks:  # after the step's checkpoint: a raise here resumes from it
            hook.on_step_end(done, start_step, backend.rank)
    if start_step >= total:  # a finished run started again: only make sure of the export
        if backend.rank == 0:
            logger.info("run already complete (%d steps); exporting the model", total)
        if not storage.is_file(storage.join(cfg.trained_model_dir(), "config.json")):
            _export(cfg, engine, tokenizer, backend, {})
        trackers.finish(cfg.trained_model_dir())


def _export(cfg: Config, engine: Any, tokenizer: Any, backend: Backend,
            extra: dict[str, Any]) -> None:
    """The trained student as a Hugging Face folder (``<output_dir>/train/model/``); a LoRA
    run also writes its adapter (``<output_dir>/train/adapter/``) and merges it for the
    former. Collective."""
    model = engine.module.model
    if cfg.train.lora is None:
        from palign.train.export import export_model

        export_model(model, tokenizer, cfg.trained_model_dir(), backend.rank, extra=extra)
        return
    from palign.engines.models import resolve_model
    from palign.train.lora import export_lora

    export_lora(model, tokenizer, resolve_model(cfg.models.student, cfg.models.cache_dir),
                cfg.trained_adapter_dir(), cfg.trained_model_dir(), backend.rank, extra)


def _finish(cfg: Config, engine: Any, tokenizer: Any, backend: Backend,
            progress: Progress, engine_rows: tuple[int, int]) -> dict[str, Any]:
    """Export, then the run's summary (also ``<output_dir>/train/summary.json``);
    ``engine_rows``: the rows trained on and those rejected by the preparation."""
    out = cfg.trained_model_dir()
    _export(cfg, engine, tokenizer, backend,
            {"train": cfg.train.model_dump(mode="json"), "steps": len(progress.losses),
             "final_loss": progress.losses[-1] if progress.losses else None,
             **progress.params})
    summary = {
        "done": True,
        "losses": list(progress.losses),
        "rows_per_step": list(progress.rows),
        "final_loss": progress.losses[-1] if progress.losses else None,
        "run_tokens_per_s": progress.tokens / progress.seconds if progress.seconds else 0.0,
        "model_dir": str(out),
        "rows_used": engine_rows[0], "rows_rejected": engine_rows[1],
        **progress.params,
    }
    if cfg.train.lora is not None:
        summary["adapter_dir"] = cfg.trained_adapter_dir()
    if backend.rank == 0:
        storage.write_text(storage.join(storage.absolute(cfg.stage_dir("train")), "summary.json"),
                           json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m palign.train.loop CONFIG`` (under torchrun): one worker of a torchrun job."""
    from palign.config import load_config
    from palign.engines.revisions import pin

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m palign.train.loop",
        description="One worker of a torchrun SFT job (no Ray): trains on <output_dir>/align.")
    parser.add_argument("config", help="the run's YAML config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    try:  # every rank refuses a checkpoint of another config alike; rank 0 records this one
        guard_resume(cfg, writer=int(os.environ.get("RANK", 0)) == 0)
    except ConfigChanged as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A hub student at the commit the fingerprint above recorded (each rank pins it as the Ray
    # trainer's driver does for all: a rank that found another commit refused above).
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"student": pin(cfg.models.student)})})
    # torchrun's ranks share this folder, and the student as written keeps the units' key
    train_worker(absolute_paths(cfg).model_dump(mode="json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
