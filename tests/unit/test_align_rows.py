"""The align stage's row logic with the real grader; continuations are scripted so the expected
grades are known (the real engines run in test_pipeline.py): grading, the drop_wrong policy,
gold answers found in worked solutions of the kinds s1K-1.1 holds, uncheckable rows, and the
plain-SFT target (the teacher's own text)."""

import pytest

from palign.engines.base import Completion
from palign.method.grading import Grader
from palign.stages.align import AlignSection, align_rows


class ScriptedStudent:
    name = "scripted"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, chats, sampling):
        assert all("Draft:\n" in c[0]["content"] for c in chats)
        return [Completion(t, completion_tokens=5) if t is not None
                else Completion(error="prompt too long: 9 tokens + 1 new > max_model_len 8")
                for t in self.texts]


ROWS = [
    {"id": "right", "question": "2*24?", "answer": "48", "prefix": "Double 24."},
    {"id": "wrong", "question": "2*24?", "answer": "48", "prefix": "Double 24."},
    {"id": "from-prefix", "question": "2*24?", "answer": "48", "prefix": "So \\boxed{48}."},
    {"id": "too-long", "question": "2*24?", "answer": "48", "prefix": "x"},
    {"id": "no-prefix", "question": "2*24?", "answer": "48"},
]
TEXTS = ["That is \\boxed{48.0}.", "So \\boxed{47}.", "Done, as above.", None]


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=10) as g:
        yield g


def test_keep_all_grades_the_targets_last_box(grader):
    out = align_rows(ROWS, ScriptedStudent(TEXTS), grader, AlignSection(policy="keep_all"))
    right, wrong, prefix_box, too_long, no_prefix = out
    assert right.record["answer_correct"] and right.record["answer_source"] == "continuation"
    assert right.record["target"] == (
        "<Begin_of_Draft>Double 24.<End_of_Draft>\nThat is \\boxed{48.0}.")
    assert not wrong.record["answer_correct"] and wrong.record["predicted_answer"] == "47"
    assert prefix_box.record["answer_correct"] and prefix_box.record["answer_source"] == "prefix"
    assert not too_long.ok and "prompt too long" in too_long.reason
    assert not no_prefix.ok and "no prefix" in no_prefix.reason


def test_drop_wrong_sends_wrong_answers_to_rejects(grader):
    out = align_rows(ROWS[:3], ScriptedStudent(TEXTS[:3]), grader,
                     AlignSection(policy="drop_wrong"))
    assert [o.ok for o in out] == [True, False, True]
    assert "wrong answer: predicted '47', gold '48'" in out[1].reason


# Continuations where the extraction modes differ (their grades are pinned in test_grading.py).
MODE_ROWS = [
    {"id": "unboxed", "question": "2*24?", "answer": "48", "prefix": "Double 24."},
    {"id": "box-then-final", "question": "2*24?", "answer": "48", "prefix": "Double 24."},
    {"id": "from-prefix", "question": "2*24?", "answer": "48", "prefix": "So \\boxed{48}."},
]
MODE_TEXTS = ["Twice 24 is 48.", "So \\boxed{47}. Hmm, so the final answer is 48.",
              "Done, as above."]


def test_extract_from_config_picks_the_grade(grader):
    strict = align_rows(MODE_ROWS, ScriptedStudent(MODE_TEXTS), grader,
                        AlignSection(policy="keep_all"))
    flexible = align_rows(MODE_ROWS, ScriptedStudent(MODE_TEXTS), grader,
                          AlignSection(policy="keep_all", extract="flexible"))

    def grades(outcomes):
        return [(o.record["answer_correct"], o.record["predicted_answer"],
                 o.record["grade_status"], o.record["answer_source"]) for o in outcomes]

    assert grades(strict) == [(False, None, "no_answer", None),  # no box anywhere
                              (False, "47", "ok", "continuation"),
                              (True, "48", "ok", "prefix")]
    assert grades(flexible) == [(True, "48", "ok", "continuation"),  # the unboxed number
                                (True, "48", "ok", "continuation"),  # "final answer is" wins
                                (True, "48", "ok", "prefix")]
    assert {o.record["answer_extract"] for o in strict} == {"strict"}
    assert {o.record["answer_extract"] for o in flexible} == {"flexible"}


def test_drop_wrong_uses_the_configured_mode(grader):
    strict = align_rows(MODE_ROWS, ScriptedStudent(MODE_TEXTS), grader,
                        AlignSection(policy="drop_wrong"))
    flexible = align_rows(MODE_ROWS, ScriptedStudent(MODE_TEXTS), grader,
                          AlignSection(policy="drop_wrong", extract="flexible"))
    assert [o.ok for o in strict] == [False, False, True]
    assert [o.ok for o in flexible] == [True, True, True]


# Worked solutions as s1K-1.1's `solution` column holds them, and the final answer each gives.
SOLUTIONS = {
    "boxed": ("Let $x$ be the side. Then $x^2 = 49$, so the answer is $x = \\boxed{7}$.",
              "7", "boxed"),
    "final line": ("We count the cases: 3 + 4 + 5 = 12 arrangements.\n\nAnswer: 12", "12",
                   "answer phrase"),
    "final answer is": ("Summing the series gives 1/2.\nThe final answer is $\\frac{1}{2}$.",
                        "\\frac{1}{2}", "answer phrase"),
    "proof": ("Suppose $n$ is odd, so $n = 2k + 1$. Then $n^2 = 4k^2 + 4k + 1$, which is odd. "
              "Hence the claim holds for every odd $n$. $\\blacksquare$", None, "none"),
    "bare expression": ("Expanding, we get $a^2 + 2ab + b^2$, as required.", None, "none"),
}


@pytest.mark.parametrize("kind", sorted(SOLUTIONS))
def test_a_worked_solutions_final_answer_is_found(grader, kind):
    text, answer, source = SOLUTIONS[kind]
    assert grader.final_answer(text) == (answer, source)


def solution_rows():
    return [{"id": kind, "question": "Q?", "answer": text, "prefix": "Start."}
            for kind, (text, _, _) in SOLUTIONS.items()]


def test_gold_from_solutions_counts_right_wrong_and_uncheckable(grader):
    texts = ["So \\boxed{7}.", "So \\boxed{11}.", "So \\boxed{0.5}.", "Done.", "Done."]
    keep = align_rows(solution_rows(), ScriptedStudent(texts), grader,
                      AlignSection(gold="solution", policy="drop_wrong"))
    by_id = {o.id: o for o in keep}
    assert by_id["boxed"].record["answer_correct"] is True
    assert by_id["boxed"].record["gold_answer"] == "7"
    assert by_id["final answer is"].record["gold_source"] == "answer phrase"
    assert not by_id["final line"].ok and "gold '12'" in by_id["final line"].reason
    for kind in ("proof", "bare expression"):  # kept, unchecked (align.uncheckable: keep)
        rec = by_id[kind].record
        assert rec["answer_correct"] is None and rec["grade_status"] == "no_gold"
    reject = align_rows(solution_rows(), ScriptedStudent(texts), grader,
                        AlignSection(gold="solution", uncheckable="reject"))
    assert [o.ok for o in reject] == [True, True, True, False, False]
    assert reject[3].kind == "row" and reject[3].reason.startswith("uncheckable")


class NoEngine:
    def generate(self, chats, sampling):
        raise AssertionError("the plain-SFT target runs no engine")


def test_teacher_target_is_the_teachers_own_text(grader):
    rows = [{"id": "a", "question": "2*24?", "answer": "48", "prefix": "Double 24 is 48.",
             "attempt": "The answer is $\\boxed{48}$."},
            {"id": "b", "question": "2*24?", "answer": "48", "prefix": "It is 49, \\boxed{49}."}]
    out = align_rows(rows, NoEngine(), grader, AlignSection(target="teacher"))
    a, b = (o.record for o in out)
    assert a["target"] == "Double 24 is 48.\n\nThe answer is $\\boxed{48}$."
    assert "Draft" not in a["target"] and a["continuation"] is None
    assert a["answer_correct"] and a["answer_source"] == "teacher"
    assert b["target"] == "It is 49, \\boxed{49}." and b["answer_correct"] is False
