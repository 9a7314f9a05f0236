"""generate: the teacher writes a CoT for every row that has none; rows with one pass through.

Output row: the problem record with ``cot`` filled and ``cot_source`` ("data" or "teacher");
a CoT the teacher wrote adds its token counts (``teacher_prompt_tokens``, ``teacher_tokens``),
its ``teacher_finish`` reason and ``teacher_model``, the model a remote server says answered
(null for a local engine), so a run's cost and its teacher can be read from its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field

from palign.common.modelref import split_revision
from palign.config import Config, EngineStageSection, SamplingConfig
from palign.engines.base import Engine, Sampling
from palign.method.prompts import teacher_chat
from palign.stages.base import BatchMetrics, Context, Outcome, Row, Stage, field_tokens, rejected


class GenerateSection(EngineStageSection):
    sampling: SamplingConfig = Field(
        default=SamplingConfig(repetition_penalty=1.0),
        description="How the teacher samples the CoTs it writes.")
    min_cot_chars: int = Field(
        default=1, ge=1,
        description="Teacher outputs shorter than this many characters are rejected.")


def sampling_for(section: Any) -> Sampling:
    s = section.sampling
    return Sampling(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        seed=s.seed,
    )


def generate_rows(
    rows: list[dict[str, Any]], get_engine: Callable[[], Engine] | None, cfg: GenerateSection
) -> list[Outcome]:
    """``get_engine`` builds the teacher on first need, so batches with CoTs load no model."""
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, row in enumerate(rows):
        if row.get("cot"):
            outcomes[i] = Outcome(row["id"], {**row, "cot_source": "data"})
        elif get_engine is None:
            outcomes[i] = rejected(row, "no CoT in the data and no models.teacher configured")
        else:
            todo.append(i)
    if todo:
        engine = get_engine()
        done = engine.generate([teacher_chat(rows[i]["question"]) for i in todo], sampling_for(cfg))
        for i, comp in zip(todo, done):
            row = rows[i]
            if comp.error:
                outcomes[i] = rejected(row, f"teacher: {comp.error}")
            elif len(comp.text.strip()) < cfg.min_cot_chars:
                outcomes[i] = rejected(
                    row, f"teacher CoT has {len(comp.text.strip())} characters, "
                         f"under generate.min_cot_chars={cfg.min_cot_chars}")
            else:
                outcomes[i] = Outcome(row["id"], {
                    **row, "cot": comp.text, "cot_source": "teacher",
                    "teacher_tokens": comp.completion_tokens,
                    "teacher_prompt_tokens": comp.prompt_tokens,
                    "teacher_finish": comp.finish_reason,
                    "teacher_model": comp.model or None,
                })
    return [outcomes[i] for i in range(len(rows))]


def summary_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """How many CoTs the teacher wrote (the others came with the data)."""
    sources = columns.get("cot_source", ())
    return {"teacher_written": sum(s == "teacher" for s in sources)} if len(sources) else {}


class Generate(Stage):
    name = "generate"
    description = "The teacher writes a CoT for every row without one."
    Section = GenerateSection
    # Rows that came with a CoT pass through; the teacher is started only for the others.
    input_columns = ("has_cot",)
    index_columns = ("cot_source",)
    remote_engine = True  # chat completions only: a teacher behind an OpenAI-compatible API

    def model(self, cfg: Config) -> str | None:
        return cfg.models.teacher

    def needs_engine(self, cfg: Config) -> bool:
        return cfg.models.teacher is not None

    def engine_for(self, columns: Mapping[str, Sequence[Any]]) -> bool:
        return not all(columns.get("has_cot") or [False])

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        # a remote teacher is a name the server knows, not files to look for here
        if not cfg.models.teacher or cfg.generate.engine.is_remote():
            return []
        return [("models.teacher", cfg.models.teacher)]

    def check(self, cfg: Config) -> list[str]:
        if cfg.data.fields.cot is None and not cfg.models.teacher:
            return ["models.teacher: required when the data has no CoT field"]
        engine = cfg.generate.engine
        rev = split_revision(cfg.models.teacher)[1] if cfg.models.teacher else None
        if rev is not None and engine.is_remote():
            return [f"models.teacher: a revision (@{rev}) cannot be pinned on a remote engine "
                    f"(generate.engine.backend: {engine.backend}): the server chooses the "
                    "weights"]
        return []

    def prompts(self) -> dict[str, Any]:
        return {"teacher": teacher_chat("{question}")}

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        engine = ctx.engine
        return generate_rows(rows, (lambda: engine) if engine is not None else None,
                             ctx.section)

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return field_tokens(records, "teacher_tokens")

    def index(self, record: Row) -> dict[str, Any]:
        return {"cot_source": record.get("cot_source")}

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        return summary_stats(columns)
