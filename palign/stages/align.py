"""align: the student continues from the chosen prefix; the result is the training target.

Output row: the truncate record plus continuation, target
(``<Begin_of_Draft>{prefix}<End_of_Draft>\\n{continuation}``; with ``align.target: teacher`` the
teacher's own text, no continuation), target_kind, gold_answer and gold_source (with
``align.gold: solution`` the final answer found in a worked solution: boxed, answer phrase, or
none), predicted_answer, answer_correct (None: no gold answer to check), grade_status,
answer_extract (the extraction mode, ``align.extract``: strict grades the last box, flexible
math-verify's own extraction), answer_source (continuation, prefix or teacher: the continuation
is graded first, the prefix when the continuation has no answer) and the continuation's token
count. With ``align.policy: drop_wrong`` (the paper's Eq. 9) rows whose answer does not match
the gold one go to rejects, with the reason; rows without a gold answer are kept unchecked or
rejected (``align.uncheckable``). The summary counts right, wrong and unchecked rows, those
dropped, and the share kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from palign.config import Config, EngineStageSection, SamplingConfig
from palign.engines.base import Completion, Engine
from palign.method.grading import STATUS_UNCHECKED, ExtractMode, Grade, Grader
from palign.method.prompts import align_chat
from palign.method.targets import training_target
from palign.stages.base import BatchMetrics, Context, Outcome, Row, Stage, field_tokens, rejected
from palign.stages.generate import sampling_for


class AlignSection(EngineStageSection):
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


def align_rows(
    rows: list[dict[str, Any]], engine: Engine | None, grader: Grader, cfg: AlignSection
) -> list[Outcome]:
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, row in enumerate(rows):
        if not isinstance(row.get("prefix"), str):
            outcomes[i] = rejected(row, "no prefix (run the truncate stage first)")
        else:
            todo.append(i)
    if cfg.target == "teacher":  # the teacher's own text: nothing for the student to write
        texts = {i: teacher_text(rows[i]) for i in todo}
        finished = {i: None for i in todo}
    else:
        assert engine is not None, "align.target: draft needs the student's engine"
        chats = [align_chat(rows[i]["question"], rows[i]["prefix"]) for i in todo]
        completions = engine.generate(chats, sampling_for(cfg)) if todo else []
        finished = dict(zip(todo, completions))
        texts = {i: c.text for i, c in finished.items()}
    for i in todo:
        row, comp = rows[i], finished[i]
        if comp is not None and comp.error:
            outcomes[i] = rejected(row, f"student: {comp.error}")
            continue
        outcomes[i] = _graded(row, comp, texts[i], grader, cfg)
    return [outcomes[i] for i in range(len(rows))]


def teacher_text(row: dict[str, Any]) -> str:
    """The teacher's own text for ``row``: its (truncated) CoT, then its attempt if any."""
    attempt = row.get("attempt")
    return f"{row['prefix']}\n\n{attempt}" if attempt else row["prefix"]


def gold_of(row: Mapping[str, Any], grader: Grader, gold: str) -> tuple[str | None, str]:
    """A row's gold answer and where it came from: its answer column as given (``gold:
    answer``), or the final answer found in the worked solution there (``gold: solution``:
    boxed, answer phrase, or ``(None, "none")``). Shared with truncate's verified prefixes."""
    if gold == "solution":
        return grader.final_answer(row["answer"])
    return row["answer"], "answer"


def grade_ending(grader: Grader, prefix: str, text: str, gold: str,
                 extract: ExtractMode) -> tuple[Grade, str | None]:
    """Grade the answer a draft's continuation ends with, and say where it was found: the
    continuation's own (``"continuation"``), else the draft's (``"prefix"``: the prefix already
    held the answer and the continuation wrote none), else None (no answer at all). How align
    grades a target, and how truncate's verified prefixes grade each rollout."""
    grade, source = grader.grade(text, gold, extract), "continuation"
    if grade.status == "no_answer":
        grade, source = grader.grade(prefix, gold, extract), "prefix"
    return grade, None if grade.status == "no_answer" else source


def _graded(row: dict[str, Any], comp: Completion | None, text: str, grader: Grader,
            cfg: AlignSection) -> Outcome:
    """The align record of one row: its target and its answer graded against the gold one
    (found in a worked solution with ``align.gold: solution``), or its reject."""
    gold, gold_source = gold_of(row, grader, cfg.gold)
    source: str | None
    if gold is None:
        if cfg.uncheckable == "reject":
            return rejected(row, "uncheckable: no final answer found in the gold solution "
                                 "(no \\boxed{}, no answer phrase)")
        grade, source = Grade(correct=False, status=STATUS_UNCHECKED, predicted=None), None
    elif cfg.target == "teacher":  # the attempt (or the CoT's end) holds the answer
        grade = grader.grade(text, gold, cfg.extract)
        source = None if grade.status == "no_answer" else "teacher"
    else:  # the target's final answer: the continuation's, else the prefix's
        grade, source = grade_ending(grader, row["prefix"], text, gold, cfg.extract)
    checked = gold is not None
    record = {
        **row,
        "continuation": comp.text if comp is not None else None,
        "target": training_target(row["prefix"], text) if cfg.target == "draft" else text,
        "target_kind": cfg.target,
        "gold_answer": gold,
        "gold_source": gold_source,  # answer (as given), boxed, answer phrase or none
        "predicted_answer": grade.predicted,
        "answer_correct": grade.correct if checked else None,
        "grade_status": grade.status,
        "answer_extract": cfg.extract,
        "answer_source": source,  # which part of the target held the graded answer
        "continuation_tokens": comp.completion_tokens if comp is not None else 0,
        "continuation_finish": comp.finish_reason if comp is not None else None,
    }
    if cfg.policy == "drop_wrong" and checked and not grade.correct:
        return rejected(row, f"wrong answer: predicted {grade.predicted!r}, gold {gold!r} "
                             f"(grade status {grade.status})")
    return Outcome(row["id"], record)


def grade_of(record: Mapping[str, Any]) -> str:
    """right, wrong or unchecked: what a kept record's answer was."""
    correct = record.get("answer_correct")
    return "unchecked" if correct is None else ("right" if correct else "wrong")


def summary_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """How the targets' answers graded (right, wrong, unchecked: no gold answer found), and the
    continuations' length."""
    grades = list(columns.get("grade", ()))
    n = len(grades)
    if not n:
        return {}
    right, unchecked = grades.count("right"), grades.count("unchecked")
    return {
        "answer_correct_share": right / n,
        "kept_right": right,
        "kept_wrong": grades.count("wrong"),
        "kept_unchecked": unchecked,
        "mean_continuation_tokens": float(sum(columns["continuation_tokens"])) / n,
    }


def reject_stats(reasons: Sequence[str], kept: int) -> dict[str, float]:
    """From the rejects: the rows dropped for a wrong answer (``policy: drop_wrong``, the
    paper's Eq. 9) or an uncheckable gold, and the share of the stage's rows kept."""
    dropped = sum(r.startswith("wrong answer") for r in reasons)
    uncheckable = sum(r.startswith("uncheckable") for r in reasons)
    total = kept + len(reasons)
    return {"dropped_wrong": dropped, "rejected_uncheckable": uncheckable,
            "retention": kept / total if total else 0.0}


class Align(Stage):
    name = "align"
    description = "The student continues from the prefix; its answer is graded."
    Section = AlignSection
    grades = True
    index_columns = ("grade", "continuation_tokens")

    def model(self, cfg: Config) -> str | None:
        return cfg.models.student

    def needs_engine(self, cfg: Config) -> bool:
        return cfg.align.target == "draft"

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        return [("models.student", cfg.models.student)]

    def prompts(self) -> dict[str, Any]:
        return {"align": align_chat("{question}", "{prefix}"),
                "target": training_target("{prefix}", "{continuation}")}

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        return align_rows(rows, ctx.engine, ctx.grader, ctx.section)

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return field_tokens(records, "continuation_tokens")

    def index(self, record: Row) -> dict[str, Any]:
        return {"grade": grade_of(record),
                "continuation_tokens": int(record.get("continuation_tokens") or 0)}

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        return summary_stats(columns)

    def reject_stats(self, reasons: Sequence[str], kept: int) -> dict[str, float]:
        return reject_stats(reasons, kept)
