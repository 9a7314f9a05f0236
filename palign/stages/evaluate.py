"""evaluate: n sampled solutions per benchmark problem from the model under test, each graded.

Input row: a benchmark problem (id, question, answer, benchmark). Output row: the problem plus
``samples``, one record per sample: sample index, output, output tokens, finish reason, and
its grade in both extraction modes (see palign.core.grading): ``extracted``, ``correct`` and
``status`` (ok, no_answer, timeout, error) for the strict mode (the last box), and
``flexible_extracted``, ``flexible_correct`` and ``flexible_status`` for the flexible one
(math-verify's own extraction over the whole output). A time-out counts as wrong and stays
recorded as such. The prompt is the one the student was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from palign.core.config import EvaluateSection
from palign.core.grading import Grader
from palign.core.prompts import student_question
from palign.engines.base import Engine
from palign.stages.definition import BatchMetrics, Row, Stage
from palign.stages.generate import sampling_for
from palign.stages.outcome import Outcome, rejected


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


# Its engine serves each model under test in turn (the runner names it per run); the results
# tables are its summary (palign.core.report).
EVALUATE = Stage(
    name="evaluate",
    model=lambda cfg: None,
    needs_engine=lambda cfg: True,
    grades=True,
    process=lambda rows, engine, grader, section: evaluate_rows(rows, engine, grader, section),
    metrics=batch_metrics,
    subfolder=lambda row: f"{row['model']}/{row['benchmark']}",
)
