"""The run-wide sections: run, ray, data, models, engine (also each stage's) and output."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from palign.common.modelref import revision_problem
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
                    "folder, a folder on object storage, or a hub id (org/name, or "
                    "org/name@revision to pin a commit, branch or tag).")
    teacher: str | None = Field(
        default=None,
        description="The model that writes missing CoTs; needed when some rows have none. With "
                    "generate.engine.backend openai: the model's name as the server knows it.")
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

    @field_validator("student", "teacher", "judge")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        problem = revision_problem(value) if value else None
        if problem:
            raise PydanticCustomError("model_revision", "{problem}", {"problem": problem})
        return value


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
# Backends that reach a model over the network: no model on disk, no GPU, chat completions only.
REMOTE_BACKENDS = ("openai",)
# The name of an environment variable: what engine.api_key_env holds, never the key itself.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _problem(kind: str, text: str) -> PydanticCustomError:
    """A field's error read as it is written (no "Value error," before it), and never with the
    value in it: a key pasted into the wrong field must not reach the terminal."""
    return PydanticCustomError(kind, "{problem}", {"problem": text})


class EngineConfig(Strict):
    backend: str = Field(
        default="auto",
        description="Inference backend: auto (vLLM where installed, else transformers), vllm, "
                    "transformers, openai (an OpenAI-compatible endpoint at base_url: a vllm "
                    "serve or SGLang server, or a provider; generate and evaluate only), or a "
                    "class by import path (package.module:Class, a "
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
                    "as dead: Ray restarts it and its rows in flight count as a crash. With "
                    "backend openai: the limit on one HTTP attempt (a call may take "
                    "max_retries + 1 attempts and the waits between them).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument, passed as is (e.g. kv_cache_dtype, "
                    "max_num_batched_tokens); checked by name against vLLM's EngineArgs "
                    "before any work. With backend openai: extra fields of each chat request "
                    "(e.g. top_k, min_p, reasoning_effort).")
    base_url: str | None = Field(
        default=None,
        description="backend openai: the server's OpenAI-compatible API up to /v1 (e.g. "
                    "http://host:8000/v1); http or https, no credentials in it.")
    api_key_env: str | None = Field(
        default=None,
        description="backend openai: the NAME of the environment variable that holds the API "
                    "key, read on each worker (e.g. OPENAI_API_KEY); the key itself is never "
                    "in the config, logs or records. Null: no key is sent.")
    max_concurrency: int | None = Field(
        default=None, ge=1,
        description="backend openai: requests in flight to the endpoint from the whole stage "
                    "(for its rate limits), split evenly over replicas.max; null: "
                    "max_in_flight per replica.")
    max_retries: int = Field(
        default=6, ge=0,
        description="backend openai: retries of one request after a 429, 408, 5xx, time-out "
                    "or dropped connection; past them the endpoint counts as down and the "
                    "engine fails (its rows are not rejected).")
    retry_backoff_s: float = Field(
        default=1.0, ge=0,
        description="backend openai: the first wait before a retry, doubled each retry (with "
                    "jitter) up to retry_backoff_max_s; a Retry-After header wins, capped too.")
    retry_backoff_max_s: float = Field(
        default=60, ge=0,
        description="backend openai: the longest one wait between retries may be.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        # The shape only: preflight imports a path (palign.preflight.check_engine_kwargs).
        if (value not in ("auto", "vllm", "transformers", *REMOTE_BACKENDS)
                and not re.match(BACKEND_PATH, value)):
            raise ValueError("use auto, vllm, transformers, openai or a class by import path "
                             f"(package.module:Class), not {value!r}")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value.strip())
            _ = parts.port  # raises on a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise _problem("base_url", "an http:// or https:// URL of the OpenAI-compatible "
                                       "API, e.g. http://host:8000/v1")
        if parts.username is not None or parts.password is not None:
            raise _problem("base_url", "holds credentials; put the key in the variable "
                                       "engine.api_key_env names")
        if parts.query or parts.fragment:
            raise _problem("base_url", "a query or fragment has no place here (a key there "
                                       "would reach logs and records; put it in the variable "
                                       "engine.api_key_env names): give the URL up to /v1")
        return value.strip().rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise _problem("env_name", "the name of an environment variable (e.g. "
                                       "OPENAI_API_KEY), not the key itself")
        return value

    def is_remote(self) -> bool:
        """Whether this engine is an endpoint over the network (``REMOTE_BACKENDS``)."""
        return self.backend in REMOTE_BACKENDS

    def in_flight_per_replica(self) -> int:
        """Requests one replica holds at once: ``max_in_flight``, or a remote engine's share of
        the stage's ``max_concurrency`` (the worker's server and the runner's batches use it)."""
        if self.is_remote() and self.max_concurrency is not None:
            return self.max_concurrency // self.replicas.max
        return self.max_in_flight

    def call_limit_s(self) -> float:
        """Longest one engine call may take (the guard's limit): ``request_timeout_s``, or for
        a remote engine every attempt of a request and the longest waits between them."""
        if not self.is_remote():
            return self.request_timeout_s
        return (self.request_timeout_s * (self.max_retries + 1)
                + self.max_retries * self.retry_backoff_max_s)

    def problems(self, where: str) -> list[str]:
        """What is wrong across this engine's fields, a line per problem naming the field under
        ``where`` (``generate.engine``); asked by the config of each stage's engine."""
        out = []
        if self.is_remote():
            if self.base_url is None:
                out.append(f"{where}.base_url: required with backend {self.backend} (the "
                           "server's OpenAI-compatible URL, e.g. http://host:8000/v1)")
            if self.max_concurrency is not None and self.max_concurrency < self.replicas.max:
                out.append(f"{where}.max_concurrency: {self.max_concurrency} requests for up "
                           f"to {self.replicas.max} replicas: at least one each")
        else:
            out += [f"{where}.{name}: only for backend openai (this engine's is "
                    f"{self.backend})" for name in ("base_url", "api_key_env", "max_concurrency")
                    if getattr(self, name) is not None]
        if self.retry_backoff_max_s < self.retry_backoff_s:
            out.append(f"{where}.retry_backoff_max_s: {self.retry_backoff_max_s} s is below "
                       f"retry_backoff_s ({self.retry_backoff_s} s), the first wait")
        return out


class OutputSection(Strict):
    format: Literal["jsonl", "parquet"] = Field(
        default="jsonl", description="File format of the stages' shards.")
    shard_rows: int = Field(
        default=64, ge=1, description="At most this many rows per shard file.")
