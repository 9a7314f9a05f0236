"""The run config: one YAML file, parsed into typed models before any work starts.

Unknown keys and bad values fail with the dotted path of the field (``truncate.threshold``).
Every field's comment is its documentation; ``configs/demo.yaml`` shows them in use.
Engine settings live under ``engine:`` and can be overridden per stage under
``<stage>.engine:``; the two are merged before validation, so errors name the stage's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

STAGES = ("generate", "truncate", "align", "train", "evaluate")
ENGINE_STAGES = ("generate", "truncate", "align", "evaluate")  # stages that run inference engines
# Folder-safe names for benchmarks and evaluated models (they become output folder names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A config that cannot run; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Strict):
    name: str = "palign"
    output_dir: str = "runs/palign"  # each stage writes <output_dir>/<stage>/
    stages: list[Literal["generate", "truncate", "align", "train", "evaluate"]] = Field(
        default_factory=lambda: ["generate", "truncate", "align"], min_length=1
    )
    seed: int = 0
    # Which earlier rejects a rerun tries again: "system" (crashes of the machinery; default),
    # "all" (also the rows' own faults, e.g. after raising max_model_len) or "none".
    retry_rejects: Literal["system", "all", "none"] = "system"
    # A run holds <output_dir>/_LOCK; one whose holder stopped heartbeating this long ago (or
    # whose holder process on this host is gone) is taken over.
    lock_stale_s: float = Field(default=300, gt=0)

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError("each stage at most once")
        if list(stages) != [s for s in STAGES if s in stages]:
            raise ValueError(f"stages must keep the order {list(STAGES)}")
        return stages


class RaySection(_Strict):
    address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    num_cpus: int | None = Field(default=None, ge=1)  # local Ray only
    # Local Ray only. None: on when the run trains (Ray Train's placement-group cleaner asks
    # the state API, which the dashboard serves), off otherwise (it costs about 0.9 GiB).
    include_dashboard: bool | None = None
    progress_bars: bool = True  # Ray Data's bars, on a terminal; elsewhere a line per batch


class FieldNames(_Strict):
    id: str = "id"  # missing ids are derived from a hash of the question
    question: str = "question"
    answer: str = "answer"
    cot: str | None = "cot"  # None: the data carries no CoT; the teacher writes all of them


class DataSection(_Strict):
    path: str  # a .jsonl/.json file, a .parquet file, a folder of those, or a `datasets` folder
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    split: str | None = None  # for a DatasetDict saved on disk
    fields: FieldNames = FieldNames()
    max_cot_chars: int = Field(default=200_000, gt=0)  # longer CoTs go to rejects
    limit: int | None = Field(default=None, gt=0)  # only the first N rows (smoke runs)
    max_reject_share: float = Field(default=0.5, ge=0, le=1)  # ingest fails past this share


class ModelsSection(_Strict):
    # A short name (`smollm2-135m`), a local Hugging Face folder, or a hub id (clusters).
    student: str
    teacher: str | None = None  # needed when some rows have no CoT
    judge: str | None = None  # defaults to the student, as in the paper
    cache_dir: str | None = None  # where short names are materialised; env PALIGN_CACHE_DIR


class ReplicaRange(_Strict):
    min: int = Field(default=1, ge=1)
    max: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"replicas: max ({self.max}) is below min ({self.min})")
        return self


class EngineConfig(_Strict):
    backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto: vLLM where installed
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(default=4096, ge=64)
    batch_size: int = Field(default=16, ge=1)  # rows per actor call (searches in flight)
    replicas: ReplicaRange = ReplicaRange()  # actor pool size, min..max (autoscaling)
    cpus_per_replica: float = Field(default=1, gt=0)
    gpus_per_replica: float = Field(default=0, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU, compiled on GPU
    cpu_kv_cache_gib: float = Field(default=2.0, gt=0)
    max_num_seqs: int = Field(default=64, ge=1)
    # Requests one replica's engine holds at once, from all its batches in flight (Ray Data
    # gives a replica ceil(max_in_flight / batch_size) batches at a time); more wait, in order.
    max_in_flight: int = Field(default=64, ge=1)
    # How palign drives vLLM: step (LLMEngine stepped from one thread, in process) or
    # async_llm (vLLM's AsyncLLM; its engine core always runs in a child process).
    vllm_driver: Literal["step", "async_llm"] = "step"
    # Failures of the engine in a row before the stage fails: starts of an actor (a model that
    # does not load) and health checks after a crash, each counted per actor.
    max_failures: int = Field(default=3, ge=1)
    # Any other vLLM engine argument, passed through as is (kv_cache_dtype,
    # max_num_batched_tokens, pipeline_parallel_size, load_format, ...); checked by name
    # against vLLM's own EngineArgs before any work (palign.preflight).
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)


class _Rejects(_Strict):
    """How much a stage may reject before it fails (the share of all its rows), and how often a
    row may be in flight when its engine dies before it is rejected (kind ``system``)."""

    max_reject_share: float = Field(default=0.5, ge=0, le=1)
    max_row_attempts: int = Field(default=3, ge=1)


class SamplingConfig(_Strict):
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.6, ge=0)  # 0: greedy
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.05, gt=0)
    seed: int | None = 0


class GenerateSection(_Rejects):
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig(repetition_penalty=1.0)
    min_cot_chars: int = Field(default=1, ge=1)  # shorter teacher outputs go to rejects


class TruncateSection(_Rejects):
    engine: EngineConfig = EngineConfig()
    strategy: Literal["binary", "full", "fixed_ratio"] = "binary"
    ratio: float = Field(default=0.25, gt=0, le=1)  # fixed_ratio: share of sentences kept
    verdict: Literal["generate", "score"] = "score"  # parse generated text, or compare labels
    threshold: float = Field(default=0.5, gt=0, lt=1)  # score: P(ENOUGH) needed for ENOUGH
    judge_max_tokens: int = Field(default=16, ge=1)  # generate: tokens per verdict
    # per_row: each row's search runs on its own, probe after probe (keeps its prefix cached);
    # lockstep: a batch's searches advance in rounds, one engine call per round.
    search: Literal["per_row", "lockstep"] = "per_row"


class AlignSection(_Rejects):
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig()  # the paper's: 0.6 / 0.9 / 1.05
    policy: Literal["keep_all", "drop_wrong"] = "keep_all"
    grade_timeout_s: float = Field(default=5.0, gt=0)
    # How the target's answer is found: strict, its last \boxed{}; flexible, math-verify's own
    # extraction over the text (also finds an unboxed final number; see docs/evaluation.md).
    extract: Literal["strict", "flexible"] = "strict"


class TrainSection(_Strict):
    """Student SFT on Ray Train + DeepSpeed ZeRO; the same fields from 2 CPU workers to N x 8
    GPUs (only num_workers, use_gpu and the batch sizes change)."""

    num_workers: int = Field(default=2, ge=1)  # Ray Train workers (one per GPU on clusters)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    zero_stage: Literal[2, 3] = 2
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seq_len: int = Field(default=4096, ge=16)  # packing bin length (tokens)
    packing: bool = True  # False: one padded sequence per row (for comparison)
    overlong: Literal["reject", "truncate"] = "reject"  # rows over seq_len
    pack_window: int = Field(default=1024, ge=1)  # rows packed together (whole align shards)
    micro_batch_size: int = Field(default=1, ge=1)  # packed sequences per worker per step
    grad_accum: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps; caps epochs
    lr: float = Field(default=1e-5, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * this
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    # How packed rows are attended without one document seeing another (palign.train.attention):
    # auto = flash_varlen on a GPU with flash-attn, else documents (per-document SDPA, no S x S
    # mask); flex = FlexAttention with a document block mask (GPU: no backward on CPU); dense =
    # transformers' sdpa with its dense block-diagonal mask (memory quadratic in seq_len).
    attention: Literal["auto", "documents", "flash_varlen", "flex", "dense"] = "auto"
    # torch AdamW's fused implementation (one kernel for all parameters); auto: on wherever
    # torch has it (CUDA and CPU in torch 2.13)
    fused_optimizer: bool | Literal["auto"] = "auto"
    # Merged over the DeepSpeed config palign generates (mappings merged key by key), for any
    # DeepSpeed setting without a field here, e.g. {"zero_optimization": {"overlap_comm": true}}
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    # async: Ray Train uploads a checkpoint in the background while the next steps run (the
    # local copy is removed once uploaded); sync: the step that saves waits for the upload
    checkpoint_upload: Literal["async", "sync"] = "async"
    # ZeRO-Offload: keep the optimizer state (and its step) in CPU memory; with ZeRO-3 also the
    # parameters. Frees GPU memory for longer rows at the cost of host traffic.
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    # DeepSpeed Ulysses sequence parallelism: each packed row is split across this many workers
    # (consecutive ranks), which exchange attention heads; num_workers / this = data-parallel size
    sequence_parallel_size: int = Field(default=1, ge=1)
    loss_chunk_size: int | None = Field(default=1024, ge=1)  # None: plain full logits
    report_every: int = Field(default=1, ge=1)  # steps between ray.train.report metrics
    checkpoint_every: int = Field(default=50, ge=1)  # steps between DeepSpeed checkpoints
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1)  # worker-group restarts (-1: unbounded)
    storage_path: str | None = None  # Ray Train storage; default <output_dir>/train/ray
    seed: int = 0
    max_reject_share: float = Field(default=0.5, ge=0, le=1)  # rows not trained on (overlong)

    @model_validator(mode="after")
    def _attention_fits_the_device(self) -> TrainSection:
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
        return self


class BenchmarkFields(_Strict):
    id: str = "id"  # missing ids are derived from a hash of the question
    question: str = "question"
    answer: str = "answer"


class Benchmark(_Strict):
    name: str = Field(pattern=NAME_PATTERN)  # results go to evaluate/<model>/<name>/
    path: str  # .jsonl/.json, .parquet, a folder of those, or a `datasets` folder on disk
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    split: str | None = None
    fields: BenchmarkFields = BenchmarkFields()
    limit: int | None = Field(default=None, gt=0)  # only the first N problems


class EvalModel(_Strict):
    label: str = Field(pattern=NAME_PATTERN)  # the row name in the results table
    # "trained": this run's train export (<output_dir>/train/model); "student": models.student
    # as given (the "before" row); anything else: a short name, a local folder or a hub id.
    model: str = "trained"


class EvaluateSection(_Rejects):
    engine: EngineConfig = EngineConfig()
    benchmarks: list[Benchmark] = Field(default_factory=list)
    models: list[EvalModel] = Field(default_factory=lambda: [EvalModel(label="trained")],
                                    min_length=1)
    n: int = Field(default=3, ge=1)  # samples per problem (the paper: 3)
    sampling: SamplingConfig = SamplingConfig(max_tokens=4096, repetition_penalty=1.0)
    grade_timeout_s: float = Field(default=5.0, gt=0)  # past it an answer counts as wrong

    @model_validator(mode="after")
    def _unique(self) -> EvaluateSection:
        for what, names in (("benchmarks", [b.name for b in self.benchmarks]),
                            ("models", [m.label for m in self.models])):
            if len(set(names)) != len(names):
                raise ValueError(f"evaluate.{what}: names must be unique, got {names}")
        return self


class OutputSection(_Strict):
    format: Literal["jsonl", "parquet"] = "jsonl"
    shard_rows: int = Field(default=64, ge=1)  # at most this many rows per shard file


class Config(_Strict):
    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    data: DataSection
    models: ModelsSection
    engine: EngineConfig = EngineConfig()  # defaults for every stage's engine
    generate: GenerateSection = GenerateSection()
    truncate: TruncateSection = TruncateSection()
    align: AlignSection = AlignSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _models_present(self) -> Config:
        no_cot = self.data.fields.cot is None
        if "generate" in self.run.stages and no_cot and not self.models.teacher:
            raise ValueError("models.teacher: required when the data has no CoT field")
        if "evaluate" in self.run.stages and not self.evaluate.benchmarks:
            raise ValueError("evaluate.benchmarks: list at least one benchmark to evaluate on")
        return self

    @property
    def judge_model(self) -> str:
        return self.models.judge or self.models.student

    def stage_dir(self, stage: str) -> str:
        """``<output_dir>/<stage>``: a local path or a URI (``palign.storage``)."""
        from palign import storage

        return storage.join(self.run.output_dir, stage)


def _merge_engine(raw: dict[str, Any]) -> dict[str, Any]:
    """Give each stage the top-level engine settings, overridden by its own."""
    base = raw.get("engine") or {}
    if not isinstance(base, dict):
        return raw
    merged = dict(raw)
    for stage in ENGINE_STAGES:
        section = raw.get(stage)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            continue
        own = section.get("engine") or {}
        if not isinstance(own, dict):
            continue
        replicas = {**(base.get("replicas") or {}), **(own.get("replicas") or {})}
        engine = {**base, **own}
        if replicas:
            engine["replicas"] = replicas
        kwargs = [k for k in (base.get("engine_kwargs"), own.get("engine_kwargs")) if k]
        if kwargs and all(isinstance(k, dict) for k in kwargs):  # merged key by key too
            engine["engine_kwargs"] = {key: v for k in kwargs for key, v in k.items()}
        merged[stage] = {**section, "engine": engine}
    return merged


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {path}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(raw: Any) -> Config:
    """Validate a config given as a mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("invalid config:\n  (top level): expected a mapping of sections")
    try:
        return Config.model_validate(_merge_engine(raw))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` maps dotted paths to values.

    A config may start from another with ``extends: <path relative to it>``: mappings are
    merged key by key (this file wins), anything else (lists included) is replaced.
    """
    raw = _read_yaml(Path(path), seen=())
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(raw)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> Any:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    base_ref = raw.pop("extends")
    if not isinstance(base_ref, str):
        raise ConfigError(f"invalid config {path}:\n  extends: expected a path")
    base_path = (path.parent / base_ref).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"invalid config {path}:\n  extends: {base_ref} extends itself")
    base = _read_yaml(base_path, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise ConfigError(f"invalid config {base_path}: expected a mapping of sections")
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
