"""The sections of the inference stages: generate, truncate, align and evaluate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from palign.core.config.base import NAME_PATTERN, Strict
from palign.core.config.sections import (
    DataSection,
    EngineConfig,
    FieldNames,
    ProblemColumns,
    ProblemSource,
)


class _Rejects(Strict):
    """How much a stage may reject before it fails (the share of all its rows), and how often a
    row may be in flight when its engine dies before it is rejected (kind ``system``)."""

    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="The stage fails when more than this share of its rows is rejected.")
    max_row_attempts: int = Field(
        default=3, ge=1,
        description="Times a row may be in flight when its engine dies before it is rejected "
                    "(kind system).")


class SamplingConfig(Strict):
    max_tokens: int | None = Field(
        default=1024, ge=1,
        description="Most tokens generated per output; null: up to the context (the output "
                    "may take whatever the prompt leaves of the engine's max_model_len, as the "
                    "paper's evaluation does).")
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
    target: Literal["draft", "teacher"] = Field(
        default="draft",
        description="What the student trains on: draft, <Begin_of_Draft>{prefix}<End_of_Draft> "
                    "then its own continuation (P-ALIGN; the student continues here); teacher, "
                    "the teacher's own text, the CoT then its attempt (data.fields.attempt), no "
                    "markers, no continuation (the paper's plain-SFT baseline; no engine runs).")
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
    gold: Literal["answer", "solution"] = Field(
        default="answer",
        description="What the data's answer column holds: answer, the final answer; solution, "
                    "a worked solution (s1K-1.1's), whose final answer is its last \\boxed{}, "
                    "else what math-verify extracts after an answer phrase (\"the answer is "
                    "...\"), else none (a proof).")
    uncheckable: Literal["keep", "reject"] = Field(
        default="keep",
        description="A row whose gold answer cannot be found (gold: solution): keep it, "
                    "trained on unchecked, or reject it (kind row). The summary counts them.")


class Benchmark(ProblemSource):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="The benchmark's name; results go to evaluate/<model>/<name>/.")
    fields: ProblemColumns = Field(
        default=ProblemColumns(), description="Names of the benchmark's columns.")

    def as_data(self, path: str) -> DataSection:
        """The benchmark read as ingest reads the training data (no CoT column), from
        ``path`` (the benchmark's path as the workers see it)."""
        return DataSection(path=path, format=self.format, split=self.split, limit=self.limit,
                           fields=FieldNames(**self.fields.model_dump(), cot=None))


class EvalModel(Strict):
    label: str = Field(
        pattern=NAME_PATTERN, description="The model's row name in the results table.")
    model: str = Field(
        default="trained",
        description="trained: this run's train export (<output_dir>/train/model; a LoRA "
                    "run's merged model); adapter: a LoRA run's adapter "
                    "(<output_dir>/train/adapter, merged into its base once per machine); "
                    "student: models.student as given; anything else: a short name, a model "
                    "or LoRA adapter folder (local or on object storage) or a hub id.")


class EvaluateSection(_Rejects):
    engine: EngineConfig = Field(default=EngineConfig(), description=_STAGE_ENGINE)
    benchmarks: list[Benchmark] = Field(
        default_factory=list, description="The benchmarks to evaluate on; names are unique.")
    models: list[EvalModel] = Field(
        default_factory=lambda: [EvalModel(label="trained")], min_length=1,
        description="The models under test, one results row each; labels are unique.")
    n: int = Field(default=3, ge=1, description="Samples per problem (the paper: 3).")
    sampling: SamplingConfig = Field(
        default=SamplingConfig(max_tokens=None, repetition_penalty=1.0),
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
