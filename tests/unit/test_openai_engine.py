"""The remote backend (``engine.backend: openai``) against a stub OpenAI-compatible server on
127.0.0.1 (tests/support/fake_openai.py), no Ray: whose fault each answer is, the waits between
retries, what a request carries and what an answer becomes, and that the key never shows in an
error. (The whole pipeline against vLLM's own server: tests/e2e/test_remote_engines.py.)"""

from __future__ import annotations

import asyncio
import email.utils
import secrets
import time
import traceback

import pytest
from fake_openai import FakeOpenAI, Reply
from ports import free_port

from palign.common.failures import EngineFailure
from palign.config import EngineConfig
from palign.engines import EngineSpec, build_engine, is_remote
from palign.engines import http_retry as hr
from palign.engines.base import Sampling
from palign.engines.engine_args import kwargs_problems
from palign.engines.guard import HEALTH_CHAT, GuardedEngine
from palign.engines.openai_engine import COUNTERS, OpenAIEngine
from palign.engines.server import EngineServer

MODEL = "fake-model"
KEY_ENV = "PALIGN_UNIT_OPENAI_KEY"


@pytest.fixture
def key(monkeypatch) -> str:
    value = "sk-unit-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, value)
    return value


def spec(url: str, **fields) -> EngineSpec:
    template_kwargs = fields.pop("template_kwargs", None)
    engine = {"backend": "openai", "base_url": url, "api_key_env": KEY_ENV, "max_retries": 2,
              "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "request_timeout_s": 5,
              **fields}
    return EngineSpec.of(EngineConfig(**engine), MODEL, seed=0, template_kwargs=template_kwargs)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def no_key_in(err: BaseException, key: str) -> None:
    shown = [str(err), repr(err), "".join(traceback.format_exception(err))]
    assert all(key not in text for text in shown), shown


# -- the policy (pure) ------------------------------------------------------------------

@pytest.mark.parametrize(("status", "verdict"), [
    (200, hr.OK), (201, hr.OK), (429, hr.TRANSIENT), (408, hr.TRANSIENT), (409, hr.TRANSIENT),
    (500, hr.TRANSIENT), (502, hr.TRANSIENT), (503, hr.TRANSIENT), (401, hr.ENDPOINT),
    (403, hr.ENDPOINT), (404, hr.ENDPOINT), (405, hr.ENDPOINT), (407, hr.ENDPOINT),
    (400, hr.ROW), (413, hr.ROW), (422, hr.ROW), (302, hr.ENDPOINT),
])
def test_each_status_is_someones_fault(status, verdict):
    assert hr.classify(status) == verdict


def test_retries_are_counted_by_cause():
    assert [hr.retry_cause(s) for s in (429, 500, 503, None, 408)] == [
        "429", "5xx", "5xx", "network", "other"]


def test_backoff_is_full_jitter_doubling_up_to_the_cap():
    assert [hr.backoff_s(n, 1.0, 60, rand=lambda: 1.0) for n in range(8)] == [
        1, 2, 4, 8, 16, 32, 60, 60]
    assert hr.backoff_s(3, 1.0, 60, rand=lambda: 0.0) == 0
    assert hr.backoff_s(2, 1.0, 60, rand=lambda: 0.5) == 2
    assert hr.backoff_s(10_000, 1.0, 60, rand=lambda: 1.0) == 60  # no overflow
    draws = {hr.backoff_s(4, 1.0, 60) for _ in range(50)}
    assert len(draws) > 40 and all(0 <= d < 16 for d in draws)


def test_retry_after_in_seconds_or_as_a_date_wins_but_is_capped():
    now = time.time()
    assert hr.retry_after_s("3") == 3 and hr.retry_after_s(" 1.5 ") == 1.5
    in_ten = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.5 <= hr.retry_after_s(in_ten, now=now) <= 10
    assert hr.retry_after_s(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0
    assert hr.retry_after_s("-4") == 0
    assert [hr.retry_after_s(v) for v in (None, "", "soon", "nan")] == [None] * 4
    assert hr.wait_s(0, 1.0, 60, retry_after="7", rand=lambda: 1.0) == 7
    assert hr.wait_s(0, 1.0, 60, retry_after="3600") == 60
    assert hr.wait_s(2, 1.0, 60, retry_after="soon", rand=lambda: 1.0) == 4


def test_a_servers_message_is_read_scrubbed_and_cut():
    body = b'{"error": {"message": "bad  key sk-123\\n here", "type": "x"}}'
    assert hr.server_message(body, "sk-123") == "bad key *** here"
    assert hr.server_message(b'{"detail": "nope"}', None) == "nope"
    assert hr.server_message(b"<html>Bad Gateway</html>", None) == "<html>Bad Gateway</html>"
    assert hr.server_message(b"", None) == "(empty body)"
    long = hr.server_message(b"x" * 1000, None)
    assert len(long) == hr.MESSAGE_CHARS and long.endswith("...")


def test_engine_kwargs_palign_sets_are_refused_naming_the_field():
    problems = kwargs_problems("generate.engine.engine_kwargs",
                               {"temperature": 1, "top_k": 20, "max_completion_tokens": 9,
                                "model": "x", "min_p": 0.1}, "openai")
    assert problems == [
        "generate.engine.engine_kwargs.temperature: set by palign; use "
        "generate.sampling.temperature",
        "generate.engine.engine_kwargs.max_completion_tokens: set by palign; use "
        "generate.sampling.max_tokens",
        "generate.engine.engine_kwargs.model: set by palign; use models.* (the stage's model, "
        "as the server names it)"]
    assert kwargs_problems("evaluate.engine.engine_kwargs", {"reasoning_effort": "low"},
                           "openai") == []
    assert is_remote("openai") and not is_remote("vllm") and not is_remote("auto")


# -- the backend against a stub server --------------------------------------------------

def test_a_completion_carries_the_sampling_seed_per_row_and_extra_fields(key):
    with FakeOpenAI(key=key) as fake:
        engine = build_engine(spec(fake.url, engine_kwargs={"top_k": 20, "min_p": 0.05},
                                   template_kwargs={"enable_thinking": False}))
        try:
            assert isinstance(engine, OpenAIEngine)
            out = engine.generate([chat("a b"), chat("c"), chat("d")],
                                  Sampling(max_tokens=32, temperature=0.7, top_p=0.9,
                                           repetition_penalty=1.1, seed=7))
            plain = engine.generate([chat("e")], Sampling(max_tokens=None))
        finally:
            engine.close()
    first = next(c for c in fake.chats if c["messages"] == chat("a b"))  # sent concurrently
    assert first["model"] == MODEL
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0.7, 0.9, 32)
    assert first["repetition_penalty"] == 1.1
    assert (first["top_k"], first["min_p"]) == (20, 0.05)
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert sorted(c["seed"] for c in fake.chats[:3]) == [7, 8, 9]
    by_question = {c["messages"][-1]["content"]: c["seed"] for c in fake.chats[:3]}
    assert by_question == {"a b": 7, "c": 8, "d": 9}  # sampling.seed + the row's index
    # Fields a plain OpenAI server refuses are left out when they change nothing.
    assert not {"seed", "repetition_penalty", "max_tokens"} & set(fake.chats[3])
    assert set(fake.auth) == {f"Bearer {key}"}
    assert out[0].text == "The answer to a b is \\boxed{42}"
    assert (out[0].prompt_tokens, out[0].completion_tokens) == (2, 7)
    assert (out[0].finish_reason, out[0].model, out[0].error) == ("stop", MODEL, None)
    assert plain[0].error is None


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_split_off_by_the_server_comes_first(key, field):
    with FakeOpenAI(key=key, reasoning_field=field, cached_tokens=3) as fake:
        engine = OpenAIEngine(spec(fake.url))
        try:
            (out,) = engine.generate([chat("q")], Sampling())
        finally:
            engine.close()
    assert out.text == "Thinking about q\n\nThe answer to q is \\boxed{42}"
    assert out.cached_tokens == 3


def test_429_5xx_and_a_dropped_connection_are_retried_and_counted(key):
    script = [Reply(429, "slow down", retry_after="0"), Reply(503, "overloaded"), Reply(0)]
    with FakeOpenAI(key=key, script=script) as fake:
        engine = OpenAIEngine(spec(fake.url, max_retries=3))
        try:
            (out,) = engine.generate([chat("q")], Sampling())
            counts = engine.counters()
        finally:
            engine.close()
    assert out.error is None and out.text.endswith("\\boxed{42}")
    assert counts == {"requests": 4, "retries": 3, "retries_429": 1, "retries_5xx": 1,
                      "retries_network": 1, "retries_other": 0, "row_errors": 0}
    assert set(counts) == set(COUNTERS)


def test_a_retry_after_header_is_honoured(key):
    with FakeOpenAI(key=key, script=[Reply(429, retry_after="1")]) as fake:
        engine = OpenAIEngine(spec(fake.url, retry_backoff_max_s=5))
        try:
            start = time.monotonic()
            (out,) = engine.generate([chat("q")], Sampling())
            took = time.monotonic() - start
        finally:
            engine.close()
    assert out.error is None and 0.9 <= took < 4


def test_a_4xx_is_the_rows_fault_and_the_others_complete(key):
    def poison(n, body):
        if "POISON-400" in body["messages"][-1]["content"]:
            return Reply(400, f"This model's maximum context length is 2048 tokens {key}")
        return None

    with FakeOpenAI(key=key, rule=poison) as fake:
        engine = OpenAIEngine(spec(fake.url))
        try:
            out = engine.generate([chat("fine"), chat("POISON-400"), chat("also fine")],
                                  Sampling())
            counts = engine.counters()
        finally:
            engine.close()
    assert [o.error is None for o in out] == [True, False, True]
    assert out[1].error == (f"HTTP 400 from {fake.url}: This model's maximum context length "
                            "is 2048 tokens ***")
    assert out[1].finish_reason == "error"
    assert counts["row_errors"] == 1 and counts["retries"] == 0 and counts["requests"] == 3


def test_a_wrong_key_fails_the_engine_at_start_naming_the_url(key):
    with FakeOpenAI(key="sk-the-right-one") as fake:
        with pytest.raises(EngineFailure) as failed:
            OpenAIEngine(spec(fake.url))
    message = str(failed.value)
    assert f"GET {fake.url}/models answered HTTP 401" in message
    assert "api_key_env" in message
    no_key_in(failed.value, key)  # the server echoed the header it got
    assert fake.statuses[401] == 1  # not retried


def test_a_401_while_serving_fails_the_engine_not_the_row(key):
    with FakeOpenAI(key=key, script=[Reply(401, f"revoked: Bearer {key}")]) as fake:
        engine = OpenAIEngine(spec(fake.url))
        try:
            with pytest.raises(EngineFailure) as failed:
                engine.generate([chat("q")], Sampling())
        finally:
            engine.close()
    assert f"POST {fake.url}/chat/completions answered HTTP 401" in str(failed.value)
    no_key_in(failed.value, key)


def test_retries_used_up_fail_the_engine_naming_the_url(key):
    with FakeOpenAI(key=key, rule=lambda n, body: Reply(500, f"boom {key}")) as fake:
        engine = OpenAIEngine(spec(fake.url, max_retries=2))
        try:
            with pytest.raises(EngineFailure) as failed:
                engine.generate([chat("q")], Sampling())
            counts = engine.counters()
        finally:
            engine.close()
    message = str(failed.value)
    assert f"{fake.url}/chat/completions failed 3 attempts (engine.max_retries=2" in message
    assert "last HTTP 500: boom ***" in message
    assert (counts["requests"], counts["retries"], counts["retries_5xx"]) == (3, 2, 2)
    no_key_in(failed.value, key)


def test_an_endpoint_that_is_not_there_fails_the_start_naming_the_url(key):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineFailure) as failed:
        OpenAIEngine(spec(url, max_retries=1))
    message = str(failed.value)
    assert f"GET {url}/models failed 2 attempts (engine.max_retries=1" in message
    assert "ClientConnectorError" in message
    no_key_in(failed.value, key)


def test_an_attempt_past_its_time_limit_is_retried_then_fails(key):
    with FakeOpenAI(key=key, delay_s=3) as fake:
        engine = OpenAIEngine(spec(fake.url, request_timeout_s=0.5, max_retries=1))
        try:
            start = time.monotonic()
            with pytest.raises(EngineFailure, match="no answer within "
                                                    "engine.request_timeout_s=0.5 s"):
                engine.generate([chat("q")], Sampling())
            assert time.monotonic() - start < 2.5
            assert engine.counters()["retries_network"] == 1
        finally:
            engine.close()


def test_a_model_the_server_does_not_serve_fails_the_start(key):
    with FakeOpenAI(models=["b-model", "a-model"], key=key) as fake:
        with pytest.raises(EngineFailure, match=r"serves \['a-model', 'b-model'\], not "
                                                r"'fake-model' \(the stage's model\)"):
            OpenAIEngine(spec(fake.url))


def test_the_probe_retries_a_server_still_starting(key):
    with FakeOpenAI(key=key, probe_script=[Reply(503, "loading"), Reply(0)]) as fake:
        engine = OpenAIEngine(spec(fake.url))
        engine.close()
        engine.close()  # twice is fine
    assert fake.statuses[503] == 1 and fake.statuses[200] == 1
    assert engine.counters()["requests"] == 0  # the probe is not a chat request


def test_a_missing_key_variable_fails_the_start_naming_it(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAI() as fake:
        with pytest.raises(EngineFailure, match=f"engine.api_key_env: {KEY_ENV} is not set "
                                                "on this worker"):
            OpenAIEngine(spec(fake.url))
        assert fake.auth == []  # nothing was sent
        # No variable named: no key sent, and a server without one answers.
        engine = OpenAIEngine(spec(fake.url, api_key_env=None))
        try:
            assert engine.generate([chat("q")], Sampling())[0].error is None
        finally:
            engine.close()
        assert fake.auth == [None, None]


def test_served_through_the_engine_server_with_its_counters_in_the_stats(key):
    script = [Reply(429, retry_after="0")]
    with FakeOpenAI(key=key, script=script) as fake:
        backend = OpenAIEngine(spec(fake.url, max_concurrency=4))
        engine = GuardedEngine(EngineServer(backend, backend.spec.in_flight_per_replica()),
                               backend.spec.call_limit_s())
        try:
            async def rows() -> list:
                return await asyncio.gather(*(engine.agenerate(chat(f"q{i}"), Sampling())
                                              for i in range(6)))

            out = asyncio.run(rows())
            engine.health_check()
            stats = engine.stats()
        finally:
            engine.close()
    assert all(o.error is None for o in out)
    assert stats["requests"] == 8 and stats["retries"] == stats["retries_429"] == 1
    health = HEALTH_CHAT[-1]["content"]  # the stub counts words as tokens
    answer = len(f"The answer to {health} is 42".split())
    assert stats["completion_tokens"] == sum(o.completion_tokens for o in out) + answer
    assert stats["prompt_tokens"] == sum(o.prompt_tokens for o in out) + len(health.split())
    assert 1 <= stats["peak_in_flight"] <= 4


def test_an_engine_that_failed_says_why_without_its_exception_repr(key):
    with FakeOpenAI(key=key, rule=lambda n, body: Reply(403, f"forbidden {key}")) as fake:
        backend = OpenAIEngine(spec(fake.url))
        engine = GuardedEngine(EngineServer(backend, 2), 30)
        try:
            with pytest.raises(EngineFailure) as first:
                engine.generate([chat("q")], Sampling())
            with pytest.raises(EngineFailure) as later:
                engine.generate([chat("q")], Sampling())
        finally:
            engine.close()
    assert "answered HTTP 403" in str(first.value)
    assert "has failed: EngineFailure: openai engine: POST" in str(later.value)
    for err in (first.value, later.value):
        no_key_in(err, key)
