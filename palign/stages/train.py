"""train: the student's SFT on the aligned rows, on Ray Train with DeepSpeed (``palign.train``).

Its rows are not served batch by batch by an actor pool, so it has no ``process``: the
pipeline hands it to Ray Train by its ``driver``. It is a stage all the same for everything
else that asks about stages: its place in the list, its config section, the model preflight
checks for it. Its section, ``TrainSection``, is here too; ``palign.train`` reads it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from palign.common.plugins import IMPORT_PATH
from palign.config import Config, Strict
from palign.stages.base import Context, Outcome, Row, Stage


class LoraSection(Strict):
    """LoRA adapters (PEFT) on the frozen student: only the adapters train, sit in the
    optimizer and go into checkpoints; the export merges them into the base."""

    r: int = Field(default=16, ge=1, description="LoRA rank of each adapter.")
    alpha: float = Field(
        default=16, gt=0, description="LoRA alpha: the adapter's update is scaled by alpha / r.")
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="Modules that get adapters: names as the student's modules end (q_proj, "
                    "k_proj, ...), checked against the student before any work; all-linear: "
                    "every linear layer but the output head.")
    modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained in full beside the adapters and saved with them (e.g. "
                    "embed_tokens, lm_head when new tokens were added); null: none.")

    @model_validator(mode="after")
    def _names(self) -> LoraSection:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: name at least one module, or all-linear")
        return self


class CallbackRef(Strict):
    """A train callback named by import path, and the keyword arguments it is made with."""

    path: str = Field(
        pattern=IMPORT_PATH,
        description="The callback's class as package.module:Name, importable on every "
                    "training process (palign.train.callbacks says what it is called with).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments the class is made with.")


class TrackingSection(Strict):
    """Where the dashboards of ``train.report_to`` keep a run (docs/training.md, "Training
    logs"); every field is operational: a resume with other settings goes on."""

    tensorboard_dir: str | None = Field(
        default=None,
        description="Folder (or URI) of the TensorBoard event files; null: "
                    "<output_dir>/train/tensorboard.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (a server's http(s):// address, or file:/path); "
                    "null: the MLFLOW_TRACKING_URI environment variable, else the file store "
                    "file:<output_dir>/train/mlruns (a local output_dir only).")
    experiment: str | None = Field(
        default=None, min_length=1,
        description="MLflow experiment the run goes into; null: run.name.")
    wandb_project: str | None = Field(
        default=None, min_length=1,
        description="Weights & Biases project; null: the WANDB_PROJECT environment variable, "
                    "else palign.")


class TrainSection(Strict):
    """Student SFT on Ray Train + DeepSpeed ZeRO; the same fields from 2 CPU workers to N x 8
    GPUs (only num_workers, use_gpu and the batch sizes change)."""

    num_workers: int = Field(
        default=2, ge=1, description="Ray Train workers (one per GPU on clusters).")
    use_gpu: bool = Field(default=False, description="Give each worker one GPU.")
    cpus_per_worker: float = Field(
        default=1, gt=0, description="CPUs Ray reserves for each train worker.")
    zero_stage: Literal[2, 3] = Field(
        default=2,
        description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also the "
                    "parameters.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Training dtype; auto: bfloat16 on GPU, float32 on CPU.")
    seq_len: int = Field(
        default=4096, ge=16, description="Packing bin length in tokens.")
    packing: bool = Field(
        default=True,
        description="Pack several rows per sequence; false: one padded sequence per row (for "
                    "comparison).")
    overlong: Literal["reject", "truncate"] = Field(
        default="reject", description="What happens to rows longer than seq_len.")
    pack_window: int = Field(
        default=1024, ge=1,
        description="Rows packed together at a time (whole align shards).")
    micro_batch_size: int = Field(
        default=1, ge=1, description="Packed sequences per worker per micro-step.")
    grad_accum: int = Field(
        default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    rows_per_step: int | None = Field(
        default=None, ge=1,
        description="Rows (training examples) per optimizer step, whatever their lengths: "
                    "each step packs its rows into bins of seq_len and deals them to the "
                    "workers; the last step of an epoch takes the rest. Null: a step is "
                    "micro_batch_size x grad_accum x data-parallel workers prepared bins.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps to run, capping epochs; null: no cap.")
    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Cosine decay ends at lr times this.")
    warmup_ratio: float = Field(
        default=0.05, ge=0, lt=1,
        description="Share of the steps with a linear learning-rate warmup.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field(
        default=(0.9, 0.95), description="AdamW's (beta1, beta2).")
    lora: LoraSection | None = Field(
        default=None,
        description="Train LoRA adapters instead of every weight (PEFT); null: full "
                    "fine-tuning. {} takes the defaults below.")
    grad_clip: float = Field(
        default=1.0, gt=0, description="Gradients are clipped to this global norm.")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass to save memory.")
    attention: Literal["auto", "documents", "flash_varlen", "flex", "dense"] = Field(
        default="auto",
        description="How packed rows are attended without one seeing another: auto = "
                    "flash_varlen on a GPU with flash-attn, else documents (per-document "
                    "SDPA); flex = FlexAttention (GPU only); dense = SDPA with a dense "
                    "block-diagonal mask (memory quadratic in seq_len).")
    fused_optimizer: bool | Literal["auto"] = Field(
        default="auto",
        description="Use torch AdamW's fused implementation; auto: wherever torch has it.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged key by key over the DeepSpeed config palign generates, for any "
                    "setting without a field here, e.g. {zero_optimization: {overlap_comm: "
                    "true}}.")
    checkpoint_upload: Literal["async", "sync"] = Field(
        default="async",
        description="async: checkpoints upload in the background while training goes on; "
                    "sync: the saving step waits for the upload.")
    offload_optimizer: bool = Field(
        default=False,
        description="ZeRO-Offload: keep the optimizer state (and its step) in CPU memory, "
                    "freeing GPU memory at the cost of host traffic.")
    offload_params: bool = Field(
        default=False, description="ZeRO-3 only: also keep the parameters in CPU memory.")
    sequence_parallel_size: int = Field(
        default=1, ge=1,
        description="DeepSpeed Ulysses: split each packed row across this many consecutive "
                    "workers; num_workers / this is the data-parallel size.")
    loss_chunk_size: int | None = Field(
        default=1024, ge=1,
        description="Tokens per chunk of the LM head and loss (fp32 logits of at most "
                    "this many at a time); null: plain full logits.")
    report_every: int = Field(
        default=1, ge=1, description="Steps between reported training metrics.")
    checkpoint_every: int = Field(
        default=50, ge=1, description="Steps between DeepSpeed checkpoints.")
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    max_failures: int = Field(
        default=0, ge=-1,
        description="Worker-group restarts after a failure (-1: unbounded).")
    callbacks: list[CallbackRef] = Field(
        default_factory=list,
        description="Objects every training process calls after each step (after that "
                    "step's checkpoint, if any), e.g. to log elsewhere or to stop a run; "
                    "operational: a resume with other callbacks goes on.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Dashboards the run's metrics go to from rank 0, every step (loss, lr, "
                    "grad norm, tokens/s, rows and tokens), with the config as run "
                    "parameters and the export's path: tensorboard, mlflow, wandb, any "
                    "subset; each needs its extra (pip install 'palign[mlflow]'). Operational.")
    tracking: TrackingSection = Field(
        default_factory=TrackingSection,
        description="Where report_to's dashboards keep the run.")
    storage_path: str | None = Field(
        default=None,
        description="Ray Train storage for checkpoints; null: <output_dir>/train/ray.")
    seed: int = Field(
        default=0, description="Seed of the data order and the training RNGs.")
    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="Training fails when more than this share of the rows is not trained on "
                    "(overlong).")

    @model_validator(mode="after")
    def _each_tracker_once(self) -> TrainSection:
        twice = sorted({t for t in self.report_to if self.report_to.count(t) > 1})
        if twice:
            raise ValueError(f"train.report_to: each tracker at most once ({', '.join(twice)} "
                             "more than once)")
        return self

    @model_validator(mode="after")
    def _attention_fits_the_device(self) -> TrainSection:
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas: {list(self.adam_betas)}: each must be in [0, 1)")
        if self.rows_per_step is not None and self.grad_accum != 1:
            raise ValueError("train.grad_accum: leave it at 1 with train.rows_per_step (each "
                             "step's rows decide how many micro-batches it takes)")
        if not self.use_gpu and self.attention in ("flash_varlen", "flex"):
            raise ValueError(f"train.attention: {self.attention} needs a GPU (train.use_gpu: "
                             "true); on CPU use documents (or auto)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs zero_stage: 3 (ZeRO-2 keeps every "
                             "parameter on each GPU); use offload_optimizer")
        sp = self.sequence_parallel_size
        if sp > 1:
            if self.num_workers % sp or self.seq_len % sp:
                raise ValueError(f"train.sequence_parallel_size: {sp} must divide num_workers "
                                 f"({self.num_workers}) and seq_len ({self.seq_len})")
            if not self.packing or self.attention in ("dense", "flex"):
                raise ValueError("train.sequence_parallel_size > 1 needs packing: true and "
                                 "attention auto, documents or flash_varlen (the dense mask "
                                 "cannot be split)")
            zero = self.deepspeed.get("zero_optimization")
            if (self.zero_stage == 3 and isinstance(zero, dict)
                    and zero.get("reduce_scatter") is False):
                raise ValueError(
                    "train.deepspeed.zero_optimization.reduce_scatter: false is not supported "
                    "with sequence_parallel_size > 1 under ZeRO-3 (DeepSpeed then averages "
                    "some gradients over the data-parallel ranks and others over all ranks)")
        return self


class Train(Stage):
    name = "train"
    description = "Student SFT on Ray Train with DeepSpeed ZeRO."
    Section = TrainSection
    driver = "train"

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        return [("models.student", cfg.models.student)]

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        raise NotImplementedError("train runs on Ray Train (palign.train), not per batch")
