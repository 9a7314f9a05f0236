"""The stage worker's sorting of failures, in-process (no Ray), on a real transformers engine
serving a tiny random model: a row whose data makes palign's own code raise is rejected alone
(kind row) while the batch's other rows go through; anything the engine raises is the
machinery's fault and is raised, never turned into rejects; after a crash, a row that was in
flight too often is rejected with kind system."""

from __future__ import annotations

import json

import pytest

from palign.common.failures import MachineryError
from palign.config import parse_config
from palign.data.shards import read_rows
from palign.runtime.spec import WorkerSpec
from palign.runtime.worker import StageWorker

pytestmark = pytest.mark.model

GOOD = [{"id": f"g{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
         "prefix": f"We add {i} and 1."} for i in range(3)]


def batch(rows: list[dict]) -> dict:
    return {"record": [json.dumps(r) for r in rows]}


def outcomes(worker: StageWorker, out: dict) -> dict[str, dict]:
    """What the worker wrote for the batch (it writes its own shards; counts come back)."""
    folder = worker.out_dir
    got = {r["id"]: {"ok": True, **r} for r in read_rows(folder)}
    got |= {r["id"]: {"ok": False, **r} for r in read_rows(f"{folder}/rejects")}
    assert out["rows"] == [len(got)] and out["ok"] == [sum(g["ok"] for g in got.values())]
    return got


@pytest.fixture
def worker(tiny_model, tmp_path):
    cfg = parse_config({
        "run": {"output_dir": str(tmp_path), "stages": ["align"]}, "data": {"path": "unused.jsonl"},
        "models": {"student": tiny_model},
        "engine": {"backend": "transformers", "max_model_len": 256},
        "align": {"sampling": {"max_tokens": 4}, "max_row_attempts": 2}})
    return StageWorker(WorkerSpec.of(cfg, "align", tiny_model))


def test_a_row_that_makes_our_code_raise_is_rejected_alone(worker):
    broken = {"id": "no-question", "answer": "1", "prefix": "A start."}  # align needs one
    got = outcomes(worker, worker(batch([GOOD[0], broken, GOOD[1]])))
    assert got["g0"]["ok"] and got["g1"]["ok"] and "continuation" in got["g0"]
    assert not got["no-question"]["ok"]
    assert got["no-question"]["kind"] == "row"
    assert "KeyError: 'question'" in got["no-question"]["reason"]


def test_an_engine_that_raises_is_never_turned_into_rejects(worker):
    worker.engine.inner.close()  # the model is gone: every call now raises inside the engine
    with pytest.raises(MachineryError, match="transformers engine"):
        worker(batch(GOOD))
    # The rows stay in flight in the ledger: a retry knows they were there when it failed.
    assert worker.ledger.crashed([r["id"] for r in GOOD]) == {"g0": 1, "g1": 1, "g2": 1}


def test_after_crashes_a_row_in_flight_too_often_is_rejected_as_system(worker):
    led = worker.ledger
    for _ in range(2):  # two attempts died with g1 in flight
        led.crashed(["g1"])
        led.begin(["g1"])
        led.note(["g1"], "EngineFailure: vllm engine: EngineDeadError")
    got = outcomes(worker, worker(batch(GOOD)))  # the retry: health check, then row by row
    assert got["g0"]["ok"] and got["g2"]["ok"]
    assert got["g1"]["kind"] == "system" and not got["g1"]["ok"]
    assert "failed 2 times while serving this row (last: EngineFailure" in got["g1"]["reason"]
    assert led.size() == 0


def test_a_batch_written_by_an_earlier_attempt_is_not_served_again(worker):
    """Ray retries a task whose actor died after its write: the same rows, the same shard
    names, found committed; nothing is served or written twice."""
    first = worker(batch(GOOD))
    worker.engine.inner.close()  # serving again would now raise
    assert worker(batch(list(reversed(GOOD)))) == {
        **first, "prompt_tokens": [0], "cached_tokens": [0], "peak_in_flight": [0],
        "completion_tokens": [0], "requests": [0], "retries": [0], "work_tokens": [0]}
    assert first["work_tokens"][0] > 0  # the continuations' tokens, counted when served
    assert sorted(r["id"] for r in read_rows(worker.out_dir)) == ["g0", "g1", "g2"]
