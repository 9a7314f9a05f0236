"""Time limits on engine calls (``engine.request_timeout_s``): a call that outlives the limit is a
machinery failure (``palign.engines.guard``), and the attempt ledger names an actor that stopped
giving signs of life, so the stage's watchdog can kill it (``palign.runtime.watchdog``). The
whole path on Ray, with a SIGSTOPped engine actor, is in test_faults.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from palign.common.failures import EngineFailure
from palign.config import ConfigError, parse_config
from palign.engines.base import BackendBase, Chat, Completion, LabelScores, Sampling
from palign.engines.guard import GuardedEngine
from palign.engines.server import EngineServer
from palign.runtime.attempts import AttemptLedger

CHAT: Chat = [{"role": "user", "content": "What is 1 + 1?"}]
LIMIT = 0.3


class HangingEngine(BackendBase):
    """An engine whose calls hang while ``hang`` is set (a wedged device), until released."""

    name = "hanging"

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        if self.hang.is_set():
            self.release.wait(30)
        return [Completion(text="2", completion_tokens=1) for _ in chats]

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        if self.hang.is_set():
            self.release.wait(30)
        return [LabelScores(logprobs=dict.fromkeys(labels, -1.0)) for _ in chats]

    def close(self) -> None:
        self.release.set()


@pytest.fixture
def engine():
    inner = HangingEngine()
    yield inner
    inner.close()  # the hung calls' threads end


def timed(fn, *args):
    start = time.monotonic()
    with pytest.raises(EngineFailure, match=r"no answer within engine.request_timeout_s=0.3 s"):
        fn(*args)
    return time.monotonic() - start


def test_a_sync_call_past_the_limit_is_an_engine_failure(engine):
    guarded = GuardedEngine(engine, timeout_s=LIMIT)
    assert guarded.generate([CHAT], Sampling(max_tokens=1))[0].text == "2"  # in time: answered
    engine.hang.set()
    assert timed(guarded.generate, [CHAT], Sampling(max_tokens=1)) < LIMIT + 2
    assert timed(guarded.score_labels, [CHAT], ["A", "B"]) < LIMIT + 2
    assert timed(guarded.health_check) < LIMIT + 2


def test_an_awaited_call_past_the_limit_is_an_engine_failure(engine):
    server = EngineServer(engine, max_in_flight=4)
    guarded = GuardedEngine(server, timeout_s=LIMIT)
    try:
        assert asyncio.run(guarded.agenerate(CHAT, Sampling(max_tokens=1))).text == "2"
        engine.hang.set()
        assert timed(asyncio.run, guarded.agenerate(CHAT, Sampling(max_tokens=1))) < LIMIT + 2
        assert timed(asyncio.run, guarded.ascore_labels(CHAT, ["A", "B"])) < LIMIT + 2
    finally:
        engine.release.set()
        server.stop()


def test_an_engine_error_within_the_limit_keeps_its_own_words():
    class Broken(HangingEngine):
        def generate(self, chats, sampling):
            raise TimeoutError("the device timed out")  # the engine's own, not the limit's

    with pytest.raises(EngineFailure, match="the device timed out"):
        GuardedEngine(Broken(), timeout_s=LIMIT).generate([CHAT], Sampling())


def test_request_timeout_must_be_positive():
    raw = {"data": {"path": "x.jsonl"}, "models": {"student": "smollm2-135m"}}
    assert parse_config(raw).engine.request_timeout_s == 1800
    with pytest.raises(ConfigError, match="request_timeout_s"):
        parse_config({**raw, "engine": {"request_timeout_s": 0}})


def test_ledger_names_a_silent_actor_once_and_counts_its_rows_as_a_crash():
    now = [0.0]
    led = AttemptLedger(max_row_attempts=1, clock=lambda: now[0])
    led.watch("frozen", "handle-1")
    led.watch("busy", "handle-2")
    led.begin(["a", "b"], "frozen")
    led.begin(["c"], "busy")
    now[0] = 8.0
    led.alive("busy")
    assert led.silent(10) == []  # within the limit
    now[0] = 12.0
    assert led.silent(10) == [("frozen", "handle-1", 2)]
    assert led.silent(10) == []  # named once: a restart watches it again
    led.alive("restarted", "handle-3")  # a sign of life from an actor it does not know
    now[0] = 30.0
    assert led.silent(10) == [("busy", "handle-2", 1), ("restarted", "handle-3", 0)]
    # Ray restarts the killed actor and retries its batch: its rows crashed once, and why.
    assert led.crashed(["a", "b"]) == {"a": 1, "b": 1}
    assert led.exhausted("a")
    assert "no sign of life for 12 s" in led.reason("a")
    assert "engine.request_timeout_s=10" in led.reason("a")
    led.end(["c"], "busy")
    led.end(["a", "b"])
    assert led.size() == 0 and not led.holder
