"""Whose fault a failure is, the reject-share rule, and the attempt ledger's bookkeeping."""

from __future__ import annotations

import pytest

from palign.common.failures import (
    EngineFailure,
    GraderUnavailable,
    MachineryError,
    commonest_reasons,
    describe,
    is_machinery,
    reject_share_error,
)
from palign.runtime.attempts import AttemptLedger


class EngineDeadError(Exception):  # same name as vLLM's: recognised by name, no vLLM import
    pass


class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name
    pass


@pytest.mark.parametrize("err", [
    EngineFailure("engine raised"), GraderUnavailable("no worker"), MemoryError(),
    EngineDeadError("engine core died"), OutOfMemoryError("CUDA out of memory"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp"),
])
def test_machinery_failures_are_recognised(err):
    assert is_machinery(err)


@pytest.mark.parametrize("err", [
    KeyError("question"), ValueError("could not convert"), TypeError("NoneType"),
    RuntimeError("something about this row"),
])
def test_row_faults_are_not_machinery(err):
    assert not is_machinery(err)


def test_describe_is_one_bounded_line():
    text = describe(ValueError("a\nb   c" + "x" * 2000))
    assert text.startswith("ValueError: a b c") and "\n" not in text and len(text) <= 600


def test_reasons_count_together_whatever_their_numbers():
    reasons = ["prompt too long: 5013 tokens + 1 new > max_model_len 2048",
               "prompt too long: 6120 tokens + 1 new > max_model_len 2048",
               "no CoT to truncate"]
    (top, n), (other, m) = commonest_reasons(reasons)
    assert n == 2 and top.startswith("prompt too long: N tokens") and m == 1


def test_reject_share():
    assert reject_share_error("truncate", "truncate.max_reject_share", 5, 5, 0.5, []) is None
    msg = reject_share_error("truncate", "truncate.max_reject_share", 4, 6, 0.5,
                             ["prompt too long: 1 tokens"] * 6)
    assert "6 of 10 rows (60%)" in msg and "truncate.max_reject_share=0.5" in msg
    assert "6 x 'prompt too long: N tokens'" in msg
    # Every row rejected never passes, even where the limit allows all of them.
    assert "no row came out" in reject_share_error("align", "f", 0, 3, 1.0, ["x"] * 3)
    assert "no rows to work on" in reject_share_error("align", "f", 0, 0, 0.5, [])


def test_ledger_counts_a_crash_for_rows_left_in_flight():
    led = AttemptLedger(max_row_attempts=2)
    assert led.crashed(["a", "b"]) == {}
    led.begin(["a", "b"])
    led.note(["a", "b"], "EngineFailure: dead")
    # The actor died; Ray retries the batch: both rows were in flight once.
    assert led.crashed(["a", "b"]) == {"a": 1, "b": 1}
    assert led.reason("a") == "EngineFailure: dead"
    led.begin(["a"])
    led.end(["a"], actor="x")  # a went through on its own: forgotten
    led.begin(["b"])  # b killed the actor again, this time with no Python error
    assert led.crashed(["a", "b"]) == {"b": 2}
    assert led.exhausted("b") and not led.exhausted("a")
    assert "process died" in led.reason("b")  # the last crash's reason
    led.end(["b"])
    assert led.size() == 0  # nothing kept for rows that are done


def test_ledger_fails_an_engine_only_after_consecutive_failures():
    led = AttemptLedger(max_engine_failures=3)
    assert not led.engine_failed("actor-1", "CUDA error")
    assert not led.engine_failed("actor-1", "CUDA error")
    led.end([], actor="actor-1")  # a batch went through: the count starts again
    assert not led.engine_failed("actor-1", "CUDA error")
    assert not led.engine_failed("actor-2", "CUDA error")  # per actor
    assert not led.engine_failed("actor-1", "CUDA error")
    assert led.engine_failed("actor-1", "CUDA error")


def test_machinery_error_is_a_runtime_error():
    assert issubclass(EngineFailure, MachineryError) and issubclass(MachineryError, RuntimeError)
