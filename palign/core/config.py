"""The run config: one YAML file, parsed into typed models before any work starts.

Unknown keys and bad values fail with the dotted path of the field (``truncate.threshold``).
Every field documents itself (``Field(description=...)``; ``palign validate --explain CONFIG``
prints them all); ``configs/demo.yaml`` shows them in use.
Engine settings live under ``engine:`` and can be overridden per stage under
``<stage>.engine:``; the two are merged before validation, so errors name the stage's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python

STAGES = ("generate", "truncate", "align", "train", "evaluate")
ENGINE_STAGES = ("generate", "truncate", "align", "evaluate")  # stages that run inference engines
# Folder-safe names for benchmarks and evaluated models (they become output folder names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A config that cannot run; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Strict):
    name: str = Field(
        default="palign",
        description="The run's name: the row name in evaluation results and Ray Train's run "
                    "folder (<name>-train).")
    output_dir: str = Field(
        default="runs/palign",
        description="Where each stage writes <output_dir>/<stage>/; a local path or an "
                    "s3:// or gs:// URI.")
    stages: list[Literal["generate", "truncate", "align", "train", "evaluate"]] = Field(
        default_factory=lambda: ["generate", "truncate", "align"], min_length=1,
        description="The stages this run executes, each at most once and in pipeline order.",
    )
    seed: int = Field(default=0, description="Seed of the inference engines.")
    retry_rejects: Literal["system", "all", "none"] = Field(
        default="system",
        description="Which earlier rejects a rerun tries again: system (crashes of the "
                    "machinery), all (also the rows' own faults, e.g. after raising "
                    "max_model_len) or none.")
    lock_stale_s: float = Field(
        default=300, gt=0,
        description="A run holds <output_dir>/_LOCK; a lock whose holder stopped heartbeating "
                    "this many seconds ago (or whose process on this host is gone) is taken "
                    "over.")

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError("each stage at most once")
        if list(stages) != [s for s in STAGES if s in stages]:
            raise ValueError(f"stages must keep the order {list(STAGES)}")
        return stages


class RaySection(_Strict):
    address: str | None = Field(
        default=None,
        description="Ray cluster to use: null starts a local Ray; auto joins the running "
                    "cluster.")
    num_cpus: int | None = Field(
        default=None, ge=1,
        description="CPUs of a local Ray (null: all of the machine's).")
    include_dashboard: bool | None = Field(
        default=None,
        description="Start the dashboard of a local Ray. Null: on when the run trains (Ray "
                    "Train's cleanup needs the state API it serves), off otherwise (it costs "
                    "about 0.9 GiB).")
    progress_bars: bool = Field(
        default=True,
        description="Ray Data's progress bars on a terminal; elsewhere a log line per batch.")


class FieldNames(_Strict):
    id: str = Field(
        default="id",
        description="Column of the row id; missing ids are derived from a hash of the question.")
    question: str = Field(default="question", description="Column of the question.")
    answer: str = Field(default="answer", description="Column of the reference answer.")
    cot: str | None = Field(
        default="cot",
        description="Column of the chain of thought; null: the data has none and the teacher "
                    "writes every CoT.")


class DataSection(_Strict):
    path: str = Field(
        description="A .jsonl/.json file, a .parquet file, a folder of those, or a folder saved "
                    "by `datasets`; local or on object storage.")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        default="auto",
        description="File format of path; auto: detected from the path.")
    split: str | None = Field(
        default=None, description="The split to read from a DatasetDict saved on disk.")
    fields: FieldNames = Field(
        default=FieldNames(), description="Names of the data's columns.")
    max_cot_chars: int = Field(
        default=200_000, gt=0, description="CoTs longer than this many characters are rejected.")
    limit: int | None = Field(
        default=None, gt=0, description="Read only the first N rows (for smoke runs).")
    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="Ingest fails when more than this share of the rows is rejected.")


class ModelsSection(_Strict):
    student: str = Field(
        description="The student model: a short name (smollm2-135m), a local Hugging Face "
                    "folder, a folder on object storage, or a hub id.")
    teacher: str | None = Field(
        default=None,
        description="The model that writes missing CoTs; needed when some rows have none.")
    judge: str | None = Field(
        default=None,
        description="The model that judges prefixes in truncate; null: the student, as in "
                    "the paper.")
    cache_dir: str | None = Field(
        default=None,
        description="Where short names and object-storage models are materialised; null: "
                    "env PALIGN_CACHE_DIR or the default cache.")


class ReplicaRange(_Strict):
    min: int = Field(default=1, ge=1, description="Fewest engine replicas (actors) of a stage.")
    max: int = Field(
        default=1, ge=1,
        description="Most engine replicas of a stage; above min, Ray Data autoscales.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"replicas: max ({self.max}) is below min ({self.min})")
        return self


class EngineConfig(_Strict):
    backend: Literal["auto", "vllm", "transformers"] = Field(
        default="auto",
        description="Inference backend; auto: vLLM where installed, else transformers.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Model weights' dtype; auto: float32 on CPU, bfloat16 on GPU.")
    max_model_len: int = Field(
        default=4096, ge=64,
        description="Longest sequence (prompt plus output, in tokens) the engine accepts; "
                    "longer rows are rejected.")
    batch_size: int = Field(
        default=16, ge=1,
        description="Rows per actor call (searches in flight, for truncate).")
    replicas: ReplicaRange = Field(
        default=ReplicaRange(),
        description="Actor pool size of the stage, min..max (autoscaling).")
    cpus_per_replica: float = Field(
        default=1, gt=0, description="CPUs Ray reserves for each engine replica.")
    gpus_per_replica: float = Field(
        default=0, ge=0,
        description="GPUs of each engine replica: 0 on CPU, a fraction shares one GPU, and "
                    "with tensor parallelism it must equal tensor_parallel_size.")
    tensor_parallel_size: int = Field(
        default=1, ge=1,
        description="GPUs one vLLM engine splits the model across (all on one node).")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of a GPU's memory vLLM may take (weights plus KV cache).")
    enable_prefix_caching: bool = Field(
        default=True,
        description="vLLM's prefix cache: reuse the KV cache of prompts' shared beginnings.")
    enforce_eager: bool | None = Field(
        default=None,
        description="Run vLLM in eager mode, without compiling; null: eager on CPU, compiled "
                    "on GPU.")
    cpu_kv_cache_gib: float = Field(
        default=2.0, gt=0, description="KV cache size in GiB of vLLM on CPU.")
    max_num_seqs: int = Field(
        default=64, ge=1,
        description="Most sequences the engine runs in one step (the transformers backend's "
                    "batch size).")
    max_in_flight: int = Field(
        default=64, ge=1,
        description="Requests one replica's engine holds at once, from all its batches in "
                    "flight (a replica gets ceil(max_in_flight / batch_size) batches at a "
                    "time); more wait, in order.")
    vllm_driver: Literal["step", "async_llm"] = Field(
        default="step",
        description="How palign drives vLLM: step (LLMEngine stepped from one thread, in "
                    "process) or async_llm (vLLM's AsyncLLM, engine core in a child process).")
    max_failures: int = Field(
        default=3, ge=1,
        description="Engine failures in a row (actor starts, health checks after a crash; "
                    "counted per actor) before the stage fails.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument, passed as is (e.g. kv_cache_dtype, "
                    "max_num_batched_tokens); checked by name against vLLM's EngineArgs "
                    "before any work.")


class _Rejects(_Strict):
    """How much a stage may reject before it fails (the share of all its rows), and how often a
    row may be in flight when its engine dies before it is rejected (kind ``system``)."""

    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="The stage fails when more than this share of its rows is rejected.")
    max_row_attempts: int = Field(
        default=3, ge=1,
        description="Times a row may be in flight when its engine dies before it is rejected "
                    "(kind system).")


class SamplingConfig(_Strict):
    max_tokens: int = Field(default=1024, ge=1, description="Most tokens generated per output.")
    temperature: float = Field(
        default=0.6, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(
        default=0.9, gt=0, le=1, description="Nucleus sampling: the probability mass kept.")
    repetition_penalty: float = Field(
        default=1.05, gt=0, description="Penalty on tokens already in the text; 1 is none.")
    seed: int | None = Field(
        default=0,
        description="Sampling seed (request i of a call uses seed + i); null: unseeded.")


_STAGE_ENGINE = "This stage's engine settings, merged field by field over the top-level engine."


class GenerateSection(_Rejects):
    engine: EngineConfig = Field(default=EngineConfig(), description=_STAGE_ENGINE)
    sampling: SamplingConfig = Field(
        default=SamplingConfig(repetition_penalty=1.0),
        description="How the teacher samples the CoTs it writes.")
    min_cot_chars: int = Field(
        default=1, ge=1,
        description="Teacher outputs shorter than this many characters are rejected.")


class TruncateSection(_Rejects):
    engine: EngineConfig = Field(default=EngineConfig(), description=_STAGE_ENGINE)
    strategy: Literal["binary", "full", "fixed_ratio"] = Field(
        default="binary",
        description="binary: search for the shortest prefix the judge calls enough; full: "
                    "keep the whole CoT; fixed_ratio: keep a fixed share of the sentences.")
    ratio: float = Field(
        default=0.25, gt=0, le=1,
        description="fixed_ratio: the share of the CoT's sentences kept.")
    verdict: Literal["generate", "score"] = Field(
        default="score",
        description="How the judge answers: score compares the two labels' probabilities; "
                    "generate parses a short greedy reply.")
    threshold: float = Field(
        default=0.5, gt=0, lt=1,
        description="score: the probability of ENOUGH needed to call a prefix enough.")
    judge_max_tokens: int = Field(
        default=16, ge=1, description="generate: tokens the judge may write per verdict.")
    search: Literal["per_row", "lockstep"] = Field(
        default="per_row",
        description="per_row: each row's search runs on its own, probe after probe (keeps "
                    "its prefix cached); lockstep: a batch's searches advance in rounds, one "
                    "engine call per round.")


class AlignSection(_Rejects):
    engine: EngineConfig = Field(default=EngineConfig(), description=_STAGE_ENGINE)
    sampling: SamplingConfig = Field(
        default=SamplingConfig(),
        description="How the student continues from the prefix (the paper's 0.6 / 0.9 / 1.05).")
    policy: Literal["keep_all", "drop_wrong"] = Field(
        default="keep_all",
        description="keep_all keeps every row; drop_wrong drops rows whose graded answer is "
                    "wrong.")
    grade_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds per answer check; past it the answer is wrong.")
    extract: Literal["strict", "flexible"] = Field(
        default="strict",
        description="How the target's answer is found: strict, its last \\boxed{}; flexible, "
                    "math-verify's own extraction over the text (also unboxed numbers).")


class TrainSection(_Strict):
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
    id: str = Field(
        default="id",
        description="Column of the problem id; missing ids are derived from a hash of the "
                    "question.")
    question: str = Field(default="question", description="Column of the question.")
    answer: str = Field(default="answer", description="Column of the reference answer.")


class Benchmark(_Strict):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="The benchmark's name; results go to evaluate/<model>/<name>/.")
    path: str = Field(
        description="A .jsonl/.json file, a .parquet file, a folder of those, or a folder "
                    "saved by `datasets`.")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        default="auto",
        description="File format of path; auto: detected from the path.")
    split: str | None = Field(
        default=None, description="The split to read from a DatasetDict saved on disk.")
    fields: BenchmarkFields = Field(
        default=BenchmarkFields(), description="Names of the benchmark's columns.")
    limit: int | None = Field(
        default=None, gt=0, description="Evaluate only the first N problems.")


class EvalModel(_Strict):
    label: str = Field(
        pattern=NAME_PATTERN, description="The model's row name in the results table.")
    model: str = Field(
        default="trained",
        description="trained: this run's train export (<output_dir>/train/model); student: "
                    "models.student as given; anything else: a short name, a local folder or "
                    "a hub id.")


class EvaluateSection(_Rejects):
    engine: EngineConfig = Field(default=EngineConfig(), description=_STAGE_ENGINE)
    benchmarks: list[Benchmark] = Field(
        default_factory=list, description="The benchmarks to evaluate on; names are unique.")
    models: list[EvalModel] = Field(
        default_factory=lambda: [EvalModel(label="trained")], min_length=1,
        description="The models under test, one results row each; labels are unique.")
    n: int = Field(default=3, ge=1, description="Samples per problem (the paper: 3).")
    sampling: SamplingConfig = Field(
        default=SamplingConfig(max_tokens=4096, repetition_penalty=1.0),
        description="How the models under test sample their answers.")
    grade_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds per answer check; past it the answer is wrong.")

    @model_validator(mode="after")
    def _unique(self) -> EvaluateSection:
        for what, names in (("benchmarks", [b.name for b in self.benchmarks]),
                            ("models", [m.label for m in self.models])):
            if len(set(names)) != len(names):
                raise ValueError(f"evaluate.{what}: names must be unique, got {names}")
        return self


class OutputSection(_Strict):
    format: Literal["jsonl", "parquet"] = Field(
        default="jsonl", description="File format of the stages' shards.")
    shard_rows: int = Field(
        default=64, ge=1, description="At most this many rows per shard file.")


class Config(_Strict):
    run: RunSection = Field(
        default=RunSection(), description="The run: its name, output folder and stages.")
    ray: RaySection = Field(
        default=RaySection(), description="Where and how Ray runs.")
    data: DataSection = Field(description="The problems to distil from.")
    models: ModelsSection = Field(description="The student, teacher and judge models.")
    engine: EngineConfig = Field(
        default=EngineConfig(),
        description="Engine defaults for every stage; each stage's engine overrides them.")
    generate: GenerateSection = Field(
        default=GenerateSection(),
        description="The teacher writes a CoT for every row without one.")
    truncate: TruncateSection = Field(
        default=TruncateSection(),
        description="The prefix search: the shortest CoT prefix the judge calls enough.")
    align: AlignSection = Field(
        default=AlignSection(),
        description="The student continues from the prefix; its answer is graded.")
    train: TrainSection = Field(
        default=TrainSection(),
        description="Student SFT on Ray Train with DeepSpeed ZeRO.")
    evaluate: EvaluateSection = Field(
        default=EvaluateSection(),
        description="Sampled answers of each model under test to each benchmark "
                    "problem, graded.")
    output: OutputSection = Field(
        default=OutputSection(), description="How stages write their shards.")

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
        """``<output_dir>/<stage>``: a local path or a URI (``palign.core.storage``)."""
        from palign.core import storage

        return storage.join(self.run.output_dir, stage)

    def trained_model_dir(self) -> str:
        """Where train exports the student: ``<output_dir>/train/model``, absolute (a path or a
        URI); what evaluate's ``trained`` model is."""
        from palign.core import storage

        return storage.join(storage.absolute(self.stage_dir("train")), "model")


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


# -- explain: every field with its value, default and description (palign validate --explain) --


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # the default of a field that has none


class FieldDoc(NamedTuple):
    """One field of a config. ``path`` is dotted; the fields of a list's items read
    ``evaluate.benchmarks[].name``, with ``value`` the list of every item's value. A ``section``
    (a nested model) has its fields on the rows after it, and no value or default of its own."""

    path: str
    value: Any  # JSON-like
    default: Any  # JSON-like, or REQUIRED
    description: str
    section: bool = False


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        args = get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True
    return None, False


def config_models(root: type[BaseModel] = Config) -> list[type[BaseModel]]:
    """Every model reachable from ``root`` through its fields, ``root`` first."""
    seen: list[type[BaseModel]] = [root]
    for model in seen:
        for field in model.model_fields.values():
            nested, _ = _nested_model(field.annotation)
            if nested is not None and nested not in seen:
                seen.append(nested)
    return seen


def explain(cfg: Config) -> list[FieldDoc]:
    """Every field of ``cfg``, depth first in declaration order. A field's default is the one
    it has where it sits (``generate.sampling.repetition_penalty``: 1.0, the default
    ``generate.sampling``'s), not a stage's merged top-level ``engine``."""
    rows: list[FieldDoc] = []
    _explain(type(cfg), [cfg], None, "", False, rows)
    return rows


def _explain(model: type[BaseModel], values: list[BaseModel], default: BaseModel | None,
             prefix: str, many: bool, rows: list[FieldDoc]) -> None:
    """``values``: the instances whose fields are listed (every item of a list when ``many``);
    ``default``: the instance the defaults come from (None: the model's own field defaults)."""
    for name, field in model.model_fields.items():
        path = prefix + name
        own = [getattr(v, name) for v in values]
        if default is not None:
            dflt = getattr(default, name)
        elif field.is_required():
            dflt = REQUIRED
        else:
            dflt = field.get_default(call_default_factory=True)
        description = field.description or ""
        nested, is_list = _nested_model(field.annotation)
        if nested is None or is_list:
            value = [to_jsonable_python(v) for v in own] if many else to_jsonable_python(own[0])
            shown = dflt if dflt is REQUIRED else to_jsonable_python(dflt)
            rows.append(FieldDoc(path, value, shown, description))
            if nested is not None:  # a list of models: its items' fields, once
                items = [item for v in own for item in v]
                _explain(nested, items, None, path + "[].", True, rows)
        else:
            rows.append(FieldDoc(path, None, None, description, section=True))
            _explain(nested, own, None if dflt is REQUIRED else dflt, path + ".", many, rows)


def format_explain(cfg: Config) -> str:
    """``explain(cfg)`` as text, one line per field:
    ``path = value (default: ...) -- description``."""
    import json

    def show(v: Any) -> str:
        return "required" if v is REQUIRED else json.dumps(v, ensure_ascii=False)

    lines = []
    for row in explain(cfg):
        if row.section:
            lines.append(f"{row.path} -- {row.description}")
        else:
            lines.append(f"{row.path} = {show(row.value)} (default: {show(row.default)}) -- "
                         f"{row.description}")
    return "\n".join(lines)

