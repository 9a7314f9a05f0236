"""align: the student continues from the chosen prefix; the result is the training target.

Output row: the truncate record plus continuation, target
(``<Begin_of_Draft>{prefix}<End_of_Draft>\\n{continuation}``), predicted_answer, answer_correct,
grade_status, answer_extract (the extraction mode, ``align.extract``: strict grades the last
box, flexible math-verify's own extraction), answer_source (continuation or prefix: the
continuation is graded first, the prefix when the continuation has no answer) and the
continuation's token count. With ``align.policy: drop_wrong`` rows whose answer does not match
the gold one go to rejects, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from palign.core.config import AlignSection
from palign.core.grading import Grader
from palign.core.prompts import align_chat, training_target
from palign.engines.base import Engine
from palign.stages.definition import Stage, field_tokens
from palign.stages.generate import sampling_for
from palign.stages.outcome import Outcome, rejected


def align_rows(
    rows: list[dict[str, Any]], engine: Engine, grader: Grader, cfg: AlignSection
) -> list[Outcome]:
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, row in enumerate(rows):
        if not isinstance(row.get("prefix"), str):
            outcomes[i] = rejected(row, "no prefix (run the truncate stage first)")
        else:
            todo.append(i)
    chats = [align_chat(rows[i]["question"], rows[i]["prefix"]) for i in todo]
    completions = engine.generate(chats, sampling_for(cfg)) if todo else []
    for i, comp in zip(todo, completions):
        row = rows[i]
        if comp.error:
            outcomes[i] = rejected(row, f"student: {comp.error}")
            continue
        # The target's final answer is graded: the continuation's, else the prefix's.
        grade, source = grader.grade(comp.text, row["answer"], cfg.extract), "continuation"
        if grade.status == "no_answer":
            grade, source = grader.grade(row["prefix"], row["answer"], cfg.extract), "prefix"
            if grade.status == "no_answer":
                source = None
        record = {
            **row,
            "continuation": comp.text,
            "target": training_target(row["prefix"], comp.text),
            "predicted_answer": grade.predicted,
            "answer_correct": grade.correct,
            "grade_status": grade.status,
            "answer_extract": cfg.extract,
            "answer_source": source,  # which part of the target held the graded answer
            "continuation_tokens": comp.completion_tokens,
            "continuation_finish": comp.finish_reason,
        }
        if cfg.policy == "drop_wrong" and not grade.correct:
            outcomes[i] = rejected(
                row, f"wrong answer: predicted {grade.predicted!r}, gold {row['answer']!r} "
                     f"(grade status {grade.status})")
        else:
            outcomes[i] = Outcome(row["id"], record)
    return [outcomes[i] for i in range(len(rows))]


def summary_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """The share of targets whose answer matched the gold one, and the continuations' length."""
    n = len(columns.get("answer_correct", ()))
    if not n:
        return {}
    return {
        "answer_correct_share": sum(bool(v) for v in columns["answer_correct"]) / n,
        "mean_continuation_tokens": float(sum(columns["continuation_tokens"])) / n,
    }


ALIGN = Stage(
    name="align",
    model=lambda cfg: cfg.models.student,
    needs_engine=lambda cfg: True,
    grades=True,
    process=lambda rows, engine, grader, section: align_rows(rows, engine, grader, section),
    metrics=field_tokens("continuation_tokens"),
    index=lambda r: {"answer_correct": bool(r.get("answer_correct")),
                     "continuation_tokens": int(r.get("continuation_tokens") or 0)},
    index_columns=("answer_correct", "continuation_tokens"),
    stats=summary_stats,
)
