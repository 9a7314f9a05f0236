"""The evaluate stage's row logic with the real grader: every sample is graded in both
extraction modes; the outputs are scripted so the expected grades are known (the real engines
run in test_paper_demo.py)."""

import pytest

from palign.engines.base import Completion
from palign.method.grading import Grader
from palign.stages.evaluate import EvaluateSection, evaluate_rows


class ScriptedModel:
    name = "scripted"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, chats, sampling):
        assert len(chats) == len(self.texts)
        return [Completion(t, completion_tokens=7, finish_reason="length") for t in self.texts]


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=10) as g:
        yield g


def test_samples_carry_both_grades(grader):
    rows = [{"id": "p1", "question": "6*7?", "answer": "42", "benchmark": "b"}]
    texts = ["6*7 = 42, so the answer is 42.", "So \\boxed{42}. Hmm, so the final answer is 41."]
    [out] = evaluate_rows(rows, ScriptedModel(texts), grader, EvaluateSection(n=2))
    unboxed, boxed = out.record["samples"]
    # No box: strict finds nothing, flexible takes the final number.
    assert (unboxed["extracted"], unboxed["correct"], unboxed["status"]) == (None, False,
                                                                            "no_answer")
    assert (unboxed["flexible_extracted"], unboxed["flexible_correct"],
            unboxed["flexible_status"]) == ("42", True, "ok")
    # A box, then "final answer is 41": strict keeps the box, flexible takes the later one.
    assert (boxed["extracted"], boxed["correct"], boxed["status"]) == ("42", True, "ok")
    assert (boxed["flexible_extracted"], boxed["flexible_correct"],
            boxed["flexible_status"]) == ("41", False, "ok")
    assert [s["sample"] for s in out.record["samples"]] == [0, 1]
    assert unboxed["output_tokens"] == 7 and unboxed["finish_reason"] == "length"
