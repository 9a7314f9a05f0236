"""Tests for palign.method.grading: boxed-answer extraction and math-verify grading in a worker, in
the strict (last box) and flexible (math-verify's own extraction) modes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from palign.method.grading import Grade, Grader, last_boxed

# --------------------------------------------------------------------------- last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2} and finally \boxed{3}", "3"),
        (r"first \boxed{1}, final \boxed{\frac{1}{2", None),  # last box unbalanced
        (r"\boxed{\frac{1}{2}", None),
        ("the answer is 42", None),
        ("", None),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{x+1}", "x+1"),
        (r"\boxed {5}", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not counted
        (r"\boxed{}", ""),
        (r"\boxed{\text{(A)}} \quad", r"\text{(A)}"),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


# --------------------------------------------------------------------------- grading


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(timeout_s=5.0) as g:
        yield g


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("204", "204"),
        ("204.0", "204"),
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        ("[1, 3)", "[1,3)"),
        # math-verify 0.9 accepts an assignment against a bare value: Eq(x, 3) vs 3 is correct.
        ("x=3", "3"),
        (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
        (r"\{1, 2\}", r"\{2, 1\}"),
    ],
)
def test_equal_forms_are_correct(grader: Grader, pred: str, gold: str) -> None:
    g = grader.grade(f"Reasoning... so the answer is $\\boxed{{{pred}}}$.", gold)
    assert g == Grade(correct=True, status="ok", predicted=pred)


def test_gold_already_in_latex_form(grader: Grader) -> None:
    assert grader.grade(r"\boxed{204}", r"\boxed{204}").correct
    assert grader.grade(r"\boxed{204}", r"$204$").correct


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("205", "204"),
        (r"\frac{1}{3}", "0.5"),
        ("(1, 3]", "[1,3)"),
    ],
)
def test_wrong_answers_are_wrong(grader: Grader, pred: str, gold: str) -> None:
    g = grader.grade(f"\\boxed{{{pred}}}", gold)
    assert g == Grade(correct=False, status="ok", predicted=pred)


@pytest.mark.parametrize(
    "output",
    ["", "The answer is 204.", r"\boxed{204", r"\boxed{}", r"\boxed{   }"],
)
def test_malformed_outputs_are_no_answer(grader: Grader, output: str) -> None:
    g = grader.grade(output, "204")
    assert g.status == "no_answer"
    assert not g.correct


def test_grades_one_by_one(grader: Grader) -> None:
    grades = [grader.grade(o, "204") for o in (r"\boxed{204}", r"\boxed{205}", "no box")]
    assert [(g.correct, g.status) for g in grades] == [
        (True, "ok"),
        (False, "ok"),
        (False, "no_answer"),
    ]


def test_timeout_kills_worker_and_run_goes_on() -> None:
    # verify() of this power tower against 1 makes sympy build/evaluate 9^(9^387420489):
    # it ran for more than 12 s without finishing when tried by hand (parsing alone is ~0.1 s).
    with Grader(timeout_s=1.0) as g:
        assert g.grade(r"\boxed{1}", "1").correct  # worker started and warm
        t0 = time.monotonic()
        slow = g.grade(r"\boxed{9^{9^{9^{9}}}}", "1")
        elapsed = time.monotonic() - t0
        assert slow == Grade(correct=False, status="timeout", predicted="9^{9^{9^{9}}}")
        assert elapsed < 5.0
        assert g.restarts == 1
        # The same Grader restarts its worker and keeps grading.
        after = g.grade(r"\boxed{\frac{1}{2}}", "0.5")
        assert after == Grade(correct=True, status="ok", predicted=r"\frac{1}{2}")


def test_close_and_restart() -> None:
    g = Grader(timeout_s=5.0)
    assert g.grade(r"\boxed{3}", "3").correct
    g.close()
    g.close()  # idempotent
    assert g.grade(r"\boxed{3}", "3").correct  # lazily starts a new worker
    g.close()


def test_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError):
        Grader(timeout_s=0)


def test_unparsable_gold_is_error(grader: Grader) -> None:
    g = grader.grade(r"\boxed{204}", "")
    assert g == Grade(correct=False, status="error", predicted="204")


def test_works_from_a_non_main_thread() -> None:
    # Ray actors and vLLM call from worker threads, where signal-based time-outs fail.
    results: list[Grade] = []
    with Grader(timeout_s=1.0) as g:
        t = threading.Thread(
            target=lambda: results.extend(
                g.grade(o, gold) for o, gold in zip(
                    [r"\boxed{\frac{1}{2}}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"],
                    ["0.5", "1", "2"], strict=True)
            )
        )
        t.start()
        t.join(30)
    assert [(r.correct, r.status) for r in results] == [
        (True, "ok"),
        (False, "timeout"),
        (True, "ok"),
    ]


# --------------------------------------------------------------------------- extraction modes
# What math-verify 0.9's own extraction really does on these outputs was checked by hand with
# math_verify.parse before each expectation was written down; the flexible mode must agree.

LOOP = "Let me recheck... 7 ... wait, let me recheck ... 7 ... wait"


@pytest.mark.parametrize(
    ("output", "gold", "strict", "flexible"),
    [
        # (a) No box but a final number: strict finds nothing, flexible takes the number.
        ("Adding 40 and 2 gives 42, so the answer is 42.", "42",
         Grade(False, "no_answer", None), Grade(True, "ok", "42")),
        # (b) A box, then a later different bare number: math-verify ranks a box above a bare
        # number, so both modes take the box ...
        (r"So the sum is \boxed{12}. Wait, let me recheck: the correct count is 15.", "15",
         Grade(False, "ok", "12"), Grade(False, "ok", "12")),
        (r"So the sum is \boxed{12}. Wait, let me recheck: the correct count is 15.", "12",
         Grade(True, "ok", "12"), Grade(True, "ok", "12")),
        # ... and above a later "the answer is 15" too ...
        (r"So the sum is \boxed{12}. Wait, so the answer is 15.", "15",
         Grade(False, "ok", "12"), Grade(False, "ok", "12")),
        # ... but "final answer ... is" ranks with a box, and the rightmost of the two wins.
        (r"So the sum is \boxed{12}. Hmm, so the final answer is 15.", "15",
         Grade(False, "ok", "12"), Grade(True, "ok", "15")),
        # (c) A loop cut off by the token limit, no box: flexible takes the last number.
        (LOOP, "7", Grade(False, "no_answer", None), Grade(True, "ok", "7")),
        # A loop cut off inside its last number: flexible takes the fragment, wrong.
        ("Let me recheck: the sum is 7. Wait, let me recheck: the sum is 7. Wait, let me "
         "recheck: the sum is 1", "7", Grade(False, "no_answer", None), Grade(False, "ok", "1")),
        # A corrected box: strict takes the last one; math-verify takes every box as a set,
        # {1, 2}, which is not the single gold number.
        (r"First \boxed{1}. Wait, no: \boxed{2}.", "2",
         Grade(True, "ok", "2"), Grade(False, "ok", "1,2")),
        # The same box twice is the set {7}, which math-verify counts as 7.
        (r"So \boxed{7}. Let me double check... yes, \boxed{7}.", "7",
         Grade(True, "ok", "7"), Grade(True, "ok", "7")),
        # No number or expression anywhere: no answer in either mode.
        ("I could not finish the computation.", "7",
         Grade(False, "no_answer", None), Grade(False, "no_answer", None)),
        ("", "7", Grade(False, "no_answer", None), Grade(False, "no_answer", None)),
    ],
)
def test_modes_differ_where_math_verify_finds_another_answer(
    grader: Grader, output: str, gold: str, strict: Grade, flexible: Grade
) -> None:
    assert grader.grade(output, gold) == strict  # strict is the default mode
    assert grader.grade(output, gold, "strict") == strict
    assert grader.grade(output, gold, "flexible") == flexible
    assert grader.grade_both(output, gold) == (strict, flexible)


def test_flexible_matches_strict_on_a_clean_boxed_answer(grader: Grader) -> None:
    out = r"Reasoning... so the answer is $\boxed{\frac{1}{2}}$."
    assert grader.grade(out, "0.5", "flexible").correct
    assert [grader.grade(o, gold, "flexible") for o, gold in ((out, "0.5"), ("it is 3", "3"))] == [
        Grade(True, "ok", r"\frac{1}{2}"), Grade(True, "ok", "3")]


def test_flexible_unparsable_gold_is_error(grader: Grader) -> None:
    assert grader.grade("it is 3", "", "flexible") == Grade(False, "error", None)


def test_unknown_mode_is_refused(grader: Grader) -> None:
    with pytest.raises(ValueError, match="extraction mode"):
        grader.grade(r"\boxed{1}", "1", "loose")  # type: ignore[arg-type]


def test_flexible_extraction_runs_under_the_time_limit() -> None:
    # The whole output goes to math-verify in the worker: the same power tower as below, found
    # by its own extraction, hangs the check, which then times out like a strict one.
    with Grader(timeout_s=1.0) as g:
        assert g.grade("it is 1", "1", "flexible").correct  # worker started and warm
        t0 = time.monotonic()
        slow = g.grade(r"so it is $9^{9^{9^{9}}}$", "1", "flexible")
        assert time.monotonic() - t0 < 5.0
        assert slow == Grade(correct=False, status="timeout", predicted=None)
        assert g.restarts == 1
        assert g.grade_both(r"\boxed{2}", "2") == (Grade(True, "ok", "2"),
                                                    Grade(True, "ok", "2"))
