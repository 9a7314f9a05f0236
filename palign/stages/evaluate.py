"""evaluate: n sampled solutions per benchmark problem from the model under test, each graded.

Input row: a benchmark problem (id, question, answer, benchmark). Output row: the problem plus
``samples``, one record per sample: sample index, output, output tokens, finish reason, and
its grade in both extraction modes (see palign.method.grading): ``extracted``, ``correct`` and
``status`` (ok, no_answer, timeout, error) for the strict mode (the last box), and
``flexible_extracted``, ``flexible_correct`` and ``flexible_status`` for the flexible one
(math-verify's own extraction over the whole output). A time-out counts as wrong and stays
recorded as such. The prompt is the one the student was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from palign.common.modelref import revision_problem, split_revision
from palign.config import (
    NAME_PATTERN,
    Config,
    DataSection,
    EngineStageSection,
    FieldNames,
    ProblemColumns,
    ProblemSource,
    SamplingConfig,
    Strict,
)
from palign.engines.base import Engine
from palign.method.grading import Grader
from palign.method.prompts import student_question
from palign.stages.base import BatchMetrics, Context, Outcome, Row, Stage, rejected
from palign.stages.generate import sampling_for


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
                    "or LoRA adapter folder (local or on object storage) or a hub id "
                    "(org/name@revision pins one). With evaluate.engine.backend openai: the "
                    "model's name as the server knows it.")

    @field_validator("model")
    @classmethod
    def _revision(cls, value: str) -> str:
        if problem := revision_problem(value):
            raise PydanticCustomError("model_revision", "{problem}", {"problem": problem})
        return value


class EvaluateSection(EngineStageSection):
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


def evaluate_rows(
    rows: list[dict[str, Any]], engine: Engine, grader: Grader, cfg: EvaluateSection
) -> list[Outcome]:
    # One engine call for every sample of every row: the n copies of a prompt share its prefix
    # in the engine's cache, and the batch stays full.
    chats = [[{"role": "user", "content": student_question(row["question"])}]
             for row in rows for _ in range(cfg.n)]
    completions = engine.generate(chats, sampling_for(cfg))
    outcomes = []
    for i, row in enumerate(rows):
        mine = completions[i * cfg.n:(i + 1) * cfg.n]
        failed = next((c.error for c in mine if c.error), None)
        if failed:
            outcomes.append(rejected(row, f"model under test: {failed}"))
            continue
        samples = []
        for k, comp in enumerate(mine):
            # Both modes, always: the point is to report a paper-comparable figure beside ours.
            strict, flexible = grader.grade_both(comp.text, row["answer"])
            samples.append({
                "sample": k,
                "output": comp.text,
                "extracted": strict.predicted,
                "correct": strict.correct,
                "status": strict.status,
                "flexible_extracted": flexible.predicted,
                "flexible_correct": flexible.correct,
                "flexible_status": flexible.status,
                "output_tokens": comp.completion_tokens,
                "finish_reason": comp.finish_reason,
            })
        # the prompt's tokens: with max_tokens null an output may take what they leave
        outcomes.append(Outcome(row["id"], {**row, "prompt_tokens": mine[0].prompt_tokens,
                                            "samples": samples}))
    return outcomes


def batch_metrics(records: Sequence[Row]) -> BatchMetrics:
    """The output tokens of every sample."""
    return BatchMetrics(tokens=sum(
        int(s.get("output_tokens") or 0) for r in records
        for s in (r.get("samples") if isinstance(r.get("samples"), list) else ())
        if isinstance(s, dict)))


class Evaluate(Stage):
    """Its engine serves each model under test in turn (the runner names it per run, so
    ``model`` is None); the results tables are its summary (palign.report)."""

    name = "evaluate"
    description = ("Sampled answers of each model under test to each benchmark problem, "
                   "graded.")
    Section = EvaluateSection
    driver = "evaluate"
    grades = True
    remote_engine = True  # chat completions only: a model under test behind an API

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if cfg.evaluate.engine.is_remote():  # names the server knows, no files here
            return out
        for i, m in enumerate(cfg.evaluate.models):
            if m.model == "student":
                out.append(("models.student", cfg.models.student))
            elif m.model not in ("trained", "adapter"):  # the train stage makes those
                out.append((f"evaluate.models.{i}.model", m.model))
        return out

    def check(self, cfg: Config) -> list[str]:
        problems = []
        if not cfg.evaluate.benchmarks:
            problems.append("evaluate.benchmarks: list at least one benchmark to evaluate on")
        engine = cfg.evaluate.engine
        if engine.is_remote():
            remote = f"a remote engine (evaluate.engine.backend: {engine.backend})"
            for i, m in enumerate(cfg.evaluate.models):
                field = f"evaluate.models.{i}.model"
                if m.model in ("trained", "adapter", "student"):
                    problems.append(f"{field}: {m.model} is a model this run loads from its "
                                    f"own files, which {remote} cannot serve: name the model "
                                    "as the server knows it")
                elif (rev := split_revision(m.model)[1]) is not None:
                    problems.append(f"{field}: a revision (@{rev}) cannot be pinned on "
                                    f"{remote}: the server chooses the weights")
        return problems

    def prompts(self) -> dict[str, Any]:
        return {"question": student_question("{question}")}

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        return evaluate_rows(rows, ctx.engine, ctx.grader, ctx.section)

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return batch_metrics(records)

    def subfolder(self, row: Row) -> str:
        return f"{row['model']}/{row['benchmark']}"
