"""The run-wide sections: run, ray, data, models, engine (also each stage's) and output."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from palign.common.plugins import IMPORT_PATH
from palign.config.base import Strict
from palign.config.stages import stage_names


def _known_stage(name: str) -> str:
    """A name from the list of stages; the error reads as pydantic's own for a choice."""
    names = [repr(n) for n in stage_names()]
    if name not in stage_names():
        expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": expected})
    return name


class RunSection(Strict):
    name: str = Field(
        default="palign",
        description="The run's name: the row name in evaluation results and Ray Train's run "
                    "folder (<name>-train).")
    output_dir: str = Field(
        default="runs/palign",
        description="Where each stage writes <output_dir>/<stage>/; a local path or an "
                    "s3:// or gs:// URI.")
    stages: list[Annotated[str, AfterValidator(_known_stage)]] = Field(
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
        if list(stages) != [s for s in stage_names() if s in stages]:
            raise ValueError(f"stages must keep the order {list(stage_names())}")
        return stages


class RaySection(Strict):
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
        description="Ray Data's progress bars on a terminal; elsewhere a progress line at most "
                    "every 10 s.")


class ProblemColumns(Strict):
    """The columns every problem source has: the training data and each benchmark."""

    id: str = Field(
        default="id",
        description="Column of the row id; missing ids are derived from a hash of the question.")
    question: str = Field(default="question", description="Column of the question.")
    answer: str = Field(default="answer", description="Column of the reference answer.")


class FieldNames(ProblemColumns):
    cot: str | None = Field(
        default="cot",
        description="Column of the chain of thought; null: the data has none and the teacher "
                    "writes every CoT.")
    attempt: str | None = Field(
        default=None,
        description="Column of the teacher's answer written after its CoT (s1K-1.1: "
                    "deepseek_attempt); kept as the row's attempt. align.target: teacher trains "
                    "on the CoT followed by it. Null: none.")


class ProblemSource(Strict):
    """Where problems are read from: the training data (``data``) and each benchmark."""

    path: str = Field(
        description="A .jsonl/.json file, a .parquet file, a folder of those, or a folder saved "
                    "by `datasets`; local or on object storage.")
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = Field(
        default="auto",
        description="File format of path; auto: detected from the path.")
    split: str | None = Field(
        default=None, description="The split to read from a DatasetDict saved on disk.")
    limit: int | None = Field(
        default=None, gt=0, description="Read only the first N rows (a smoke run).")


class DataSection(ProblemSource):
    fields: FieldNames = Field(
        default=FieldNames(), description="Names of the data's columns.")
    max_cot_chars: int = Field(
        default=200_000, gt=0, description="CoTs longer than this many characters are rejected.")
    max_line_mib: int = Field(
        default=64, ge=1, le=1024,
        description="A JSONL line longer than this many MiB is rejected unread (skipped to its "
                    "end, never held in memory whole).")
    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="Ingest fails when more than this share of the rows is rejected.")
    piece_mib: int = Field(
        default=256, ge=1,
        description="A source file over this many MiB is read by several tasks, a piece of "
                    "about this size each (uncompressed JSONL by byte range, Parquet by row "
                    "groups); rows of a JSONL piece are named by byte offset (file@offset).")


class ModelsSection(Strict):
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
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the student's chat template, e.g. {enable_thinking: "
                    "false} for Qwen3: used wherever the student's template renders a chat "
                    "(the judge when it is the student, align, the training tokens, and the "
                    "evaluation of the student and of its trained export).")


class ReplicaRange(Strict):
    min: int = Field(default=1, ge=1, description="Fewest engine replicas (actors) of a stage.")
    max: int = Field(
        default=1, ge=1,
        description="Most engine replicas of a stage; above min, Ray Data autoscales.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"replicas: max ({self.max}) is below min ({self.min})")
        return self


BACKEND_PATH = IMPORT_PATH  # engine.backend by import path


class EngineConfig(Strict):
    backend: str = Field(
        default="auto",
        description="Inference backend: auto (vLLM where installed, else transformers), vllm, "
                    "transformers, or a class by import path (package.module:Class, a "
                    "palign.engines.base.Backend built from the stage's EngineSpec).")
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
    request_timeout_s: float = Field(
        default=1800, gt=0,
        description="Longest one engine call may take (a batch's generation, a row's probe "
                    "or its wait for room in the KV cache, a health check), and longest an "
                    "engine actor may go without a sign of life; past it the actor is treated "
                    "as dead: Ray restarts it and its rows in flight count as a crash.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument, passed as is (e.g. kv_cache_dtype, "
                    "max_num_batched_tokens); checked by name against vLLM's EngineArgs "
                    "before any work.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        # The shape only: preflight imports a path (palign.preflight.check_engine_kwargs).
        if value not in ("auto", "vllm", "transformers") and not re.match(BACKEND_PATH, value):
            raise ValueError("use auto, vllm, transformers or a class by import path "
                             f"(package.module:Class), not {value!r}")
        return value


class OutputSection(Strict):
    format: Literal["jsonl", "parquet"] = Field(
        default="jsonl", description="File format of the stages' shards.")
    shard_rows: int = Field(
        default=64, ge=1, description="At most this many rows per shard file.")
