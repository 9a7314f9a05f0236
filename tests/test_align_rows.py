"""The align stage's row logic with the real grader; continuations are scripted so the expected
grades are known (the real engines run in test_pipeline.py)."""

import pytest

from palign.core.config import AlignSection
from palign.core.grading import Grader
from palign.engines.base import Completion
from palign.stages.align import align_rows


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
