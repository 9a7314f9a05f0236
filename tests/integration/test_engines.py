"""Both backends on the real SmolLM2-135M: same inputs, same greedy texts, same label scores."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from palign.config import EngineConfig
from palign.engines import EngineSpec, Sampling, available_backends, build_engine
from palign.engines.base import (
    Backend,
    Completion,
    LabelScores,
    fit_prompts,
    label_first_tokens,
)
from palign.engines.dtypes import torch_dtype
from palign.engines.guard import GuardedEngine
from palign.engines.models import resolve_model
from palign.engines.server import EngineServer
from palign.stages.truncate import TruncateSection, truncate_rows

pytestmark = pytest.mark.model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
LABELS = ["ENOUGH", "NOT_ENOUGH"]  # the judge's pair (palign.method.verdict.LABELS)
MAX_LEN = 1024

QUESTIONS = [
    "What is 2+3?",
    "Name a color.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def judge_chat(question: str, opening: str) -> list[dict[str, str]]:
    return chat(
        f"Problem:\n{question}\n\nOpening of the solution:\n{opening}\n\n"
        "Answer with one word: ENOUGH if you could finish from here, NOT_ENOUGH if an "
        "essential idea is still missing."
    )


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("smollm2-135m")


def _spec(model: str, backend: str) -> EngineSpec:
    engine = EngineConfig(backend=backend, max_model_len=MAX_LEN, cpu_kv_cache_gib=1.0,
                          max_num_seqs=8)
    return EngineSpec.of(engine, model)


@pytest.fixture(scope="module")
def hf(model_path: str) -> Iterator[Backend]:
    engine = build_engine(_spec(model_path, "transformers"))
    yield engine
    engine.close()


PASSED_THROUGH = {"max_num_batched_tokens": 3072}  # engine.engine_kwargs, checked below


@pytest.fixture(scope="module")
def vllm(model_path: str) -> Iterator[Backend]:
    assert HAS_VLLM, "vLLM is not installed: the suite needs it (make setup installs it)"
    engine = build_engine(_spec(model_path, "vllm").model_copy(
        update={"engine_kwargs": PASSED_THROUGH}))
    yield engine
    engine.close()


@pytest.fixture(params=["transformers", "vllm"])
def engine(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue("hf" if request.param == "transformers" else "vllm")


def test_engine_kwargs_reach_vllm(vllm: Backend) -> None:
    config = vllm.llm.llm_engine.vllm_config  # type: ignore[attr-defined]
    assert config.scheduler_config.max_num_batched_tokens == 3072


def test_backends_listed() -> None:
    assert "transformers" in available_backends()
    assert ("vllm" in available_backends()) == HAS_VLLM
    with pytest.raises(ValueError, match="unknown engine backend"):
        build_engine(EngineSpec.of(EngineConfig(), "x").model_copy(update={"backend": "tgi"}))


def test_greedy_text_identical_across_backends(hf: Backend, vllm: Backend) -> None:
    chats = [chat(q) for q in QUESTIONS]
    greedy = Sampling(max_tokens=24)
    a, b = hf.generate(chats, greedy), vllm.generate(chats, greedy)
    for x, y in zip(a, b):
        assert x.error is None and y.error is None
        assert x.prompt_tokens == y.prompt_tokens  # same rendering, same token ids
        assert x.completion_tokens > 0 and x.finish_reason in ("stop", "length")
    # Seen identical on 4 of 4 here; allow one near-tie flip (batched fp32 matmuls differ in
    # the last bits between the backends, which can swap two almost equal logits).
    same = sum(x.text == y.text for x, y in zip(a, b))
    assert same >= 3, [(x.text, y.text) for x, y in zip(a, b)]
    assert all(x.cached_tokens == 0 for x in a)


def test_label_scores_agree(hf: Backend, vllm: Backend) -> None:
    tokenizer = hf.tokenizer  # type: ignore[attr-defined]
    assert len(set(label_first_tokens(tokenizer, LABELS))) == 2
    chats = [
        judge_chat("What is 12 * 13?", "12 * 13 = 12 * 10 + 12 * 3 = 120 + 36"),
        judge_chat("Solve x^2 = 49.", "We need a number whose square is"),
        judge_chat("How many primes are below 10?", "The primes below 10 are 2, 3, 5, 7"),
        judge_chat("What is the sum 1 + 2 + ... + 100?", "Pair 1 with 100, 2 with 99"),
    ]
    a, b = hf.score_labels(chats, LABELS), vllm.score_labels(chats, LABELS)
    for x, y in zip(a, b):
        assert x.error is None and y.error is None
        assert x.prompt_tokens == y.prompt_tokens
        assert set(x.logprobs) == set(LABELS) == set(y.logprobs)
        for label in LABELS:
            assert x.logprobs[label] < 0
            assert abs(x.logprobs[label] - y.logprobs[label]) < 1e-3, (label, x, y)


def test_labels_must_start_differently(engine: Backend) -> None:
    with pytest.raises(ValueError, match="distinct"):
        engine.score_labels([chat("Hi")], ["NOT_ENOUGH", "NOT ENOUGH"])


def test_prefix_cache_reports_cached_tokens(vllm: Backend) -> None:
    shared = " ".join(f"Step {i}: we note one more fact about the triangle." for i in range(40))
    first = chat(f"{shared}\nQuestion A: what is its area?")
    second = chat(f"{shared}\nQuestion B: what is its perimeter?")
    one = vllm.generate([first], Sampling(max_tokens=2))[0]
    two = vllm.generate([second], Sampling(max_tokens=2))[0]
    assert one.prompt_tokens > 300
    assert two.cached_tokens > 0
    assert two.cached_tokens <= two.prompt_tokens


def test_too_long_prompt_fails_alone(engine: Backend) -> None:
    long_text = "apple " * (MAX_LEN + 50)
    chats = [chat("What is 2+3?"), chat(long_text), chat("Name a color.")]
    out = engine.generate(chats, Sampling(max_tokens=8))
    assert out[0].error is None and out[0].text
    assert out[2].error is None and out[2].text
    assert out[1].error is not None
    assert out[1].error.startswith("prompt too long: ")
    assert f"+ 8 new > max_model_len {MAX_LEN}" in out[1].error
    scores = engine.score_labels(chats, LABELS)
    assert scores[1].error is not None and not scores[1].logprobs
    assert scores[0].error is None and set(scores[0].logprobs) == set(LABELS)


def test_no_max_tokens_writes_up_to_the_context(engine: Backend) -> None:
    """max_tokens None: a prompt of p tokens may take max_model_len - p new tokens, no more
    (vLLM's behaviour when max_tokens is left to the context; the paper's 4,096 in all)."""
    def words(k: int) -> list[dict[str, str]]:  # a story's opening, k words of it repeated
        return chat("Write a very long story about a fox. "
                    + " ".join(["The quick brown fox jumps over the lazy dog."] * 85)
                    + " fox" * k)

    probe = engine.generate([words(0)], Sampling(max_tokens=1))[0]
    assert probe.error is None
    k = (MAX_LEN - 6) - probe.prompt_tokens  # one token per " fox"
    near = engine.generate([words(k)], Sampling(max_tokens=None))[0]
    assert near.error is None and near.prompt_tokens == MAX_LEN - 6
    assert near.completion_tokens == 6 and near.finish_reason == "length"  # stopped by the context
    full = engine.generate([words(k + 6)], Sampling(max_tokens=None))[0]
    assert full.error is not None and full.error.startswith("prompt too long: ")


class _WordTokenizer:
    """One token per word of the rendered chat: enough for the fit check."""

    def apply_chat_template(self, chat: list[dict[str, str]], tokenize: bool,
                            add_generation_prompt: bool) -> str:
        return " ".join(m["content"] for m in chat)

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


def test_fit_prompts_rejects_rows_over_the_context() -> None:
    chats = [chat("a b c"), chat("a b c d e f"), chat("a")]
    done = [Completion() for _ in chats]
    assert fit_prompts(_WordTokenizer(), chats, 4, 8, done) == [(0, [0, 1, 2]), (2, [0])]
    assert [c.prompt_tokens for c in done] == [3, 6, 1]
    assert done[1].error == "prompt too long: 6 tokens + 4 new > max_model_len 8"
    assert done[1].finish_reason == "error" and done[0].error is None
    scores = [LabelScores() for _ in chats]
    assert [i for i, _ in fit_prompts(_WordTokenizer(), chats, 1, 7, scores)] == [0, 1, 2]
    assert all(s.error is None for s in scores)


def test_torch_dtype_names() -> None:
    import torch

    assert torch_dtype("auto", on_gpu=False) == torch.float32
    assert torch_dtype("auto", on_gpu=True) == torch.bfloat16
    assert torch_dtype("float16", on_gpu=False) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("fp16", on_gpu=True)


def test_seeded_sampling_reproduces(engine: Backend) -> None:
    chats = [chat("Tell me a short story about a robot."), chat("Name three animals.")] * 2
    sampling = Sampling(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    first = [c.text for c in engine.generate(chats, sampling)]
    again = [c.text for c in engine.generate(chats, sampling)]
    assert first == again
    other = [c.text for c in engine.generate(chats, replace(sampling, seed=7))]
    assert other != first


def test_seeded_sampling_survives_chunked_prefill(engine: Backend) -> None:
    """Prompts totalling more than one engine step's token budget get their prefill split;
    with seeded sampling that once crashed vLLM's CPU build."""
    filler = " ".join(f"Line {i}: the value {i} plus {i} gives {2 * i}." for i in range(40))
    chats = [chat(f"Problem {n}. {filler} What is the last value?") for n in range(8)]
    sampling = Sampling(max_tokens=4, temperature=0.6, top_p=0.9, seed=3)
    out = engine.generate(chats, sampling)
    assert [c.error for c in out] == [None] * 8
    assert all(c.completion_tokens > 0 for c in out)
    assert sum(c.prompt_tokens for c in out) > 4096  # vLLM's default step budget here


# -- the engine server: many callers, one engine (palign.engines.server) ----------------------


@pytest.fixture
def server(engine: Backend) -> Iterator[EngineServer]:
    srv = EngineServer(engine, max_in_flight=4)
    yield srv
    srv.stop()  # the module's engine stays open for the other tests


def test_server_answers_as_the_engine_does(engine: Backend, server: EngineServer) -> None:
    greedy = Sampling(max_tokens=16)
    direct = [c.text for c in engine.generate([chat(q) for q in QUESTIONS], greedy)]
    assert [c.text for c in server.generate([chat(q) for q in QUESTIONS], greedy)] == direct
    judged = [judge_chat(q, "Let me think.") for q in QUESTIONS]
    want = engine.score_labels(judged, LABELS)
    got = server.score_labels(judged, LABELS)
    for w, g in zip(want, got):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert g.prompt_tokens == w.prompt_tokens


def test_server_serves_threads_and_coroutines_together(engine: Backend,
                                                       server: EngineServer) -> None:
    """Two threads' batches and a dozen coroutines' single requests, all in flight together
    (never more than max_in_flight in the engine); each caller gets its own answers."""
    greedy = Sampling(max_tokens=12)
    want = {q: c.text for q, c in zip(QUESTIONS, engine.generate([chat(q) for q in QUESTIONS],
                                                                 greedy))}
    got: dict[int, list[str]] = {}

    def batch(n: int) -> None:
        got[n] = [c.text for c in server.generate([chat(q) for q in QUESTIONS], greedy)]

    async def singles() -> list[str]:
        outs = await asyncio.gather(*(server.agenerate(chat(q), greedy)
                                      for q in QUESTIONS * 3))
        return [c.text for c in outs]

    threads = [threading.Thread(target=batch, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    single = asyncio.run(singles())
    for t in threads:
        t.join()
    assert got[0] == got[1] == [want[q] for q in QUESTIONS]
    assert single == [want[q] for q in QUESTIONS * 3]
    stats = server.stats()
    assert 1 < stats["peak_in_flight"] <= 4 and stats["in_flight"] == 0
    assert stats["prompt_tokens"] > 0


def test_server_too_long_prompt_fails_alone(server: EngineServer) -> None:
    out = server.generate([chat("word " * 2000), chat("What is 2+3?")], Sampling(max_tokens=8))
    assert out[0].error and "max_model_len" in out[0].error
    assert out[1].error is None and out[1].text


def test_server_engine_that_raises_fails_every_waiter(vllm: Backend) -> None:
    """vLLM refuses max_tokens=0 by raising: that is the engine failing, not the row, so the
    request (and any later one) raises instead of coming back as a row error."""
    srv = EngineServer(vllm, max_in_flight=4)
    try:
        with pytest.raises(Exception, match="max_tokens"):
            srv.generate([chat("Hi")], Sampling(max_tokens=0))
        with pytest.raises(RuntimeError, match="has failed"):
            srv.generate([chat("Hi")], Sampling(max_tokens=4))
    finally:
        srv.stop()
    assert vllm.generate([chat("Hi")], Sampling(max_tokens=2))[0].error is None


def test_per_row_search_chooses_the_lockstep_prefixes(engine: Backend) -> None:
    """The same rows searched probe by probe through the server (each row its own coroutine)
    and in lockstep rounds on the engine itself: the same probes, verdicts and prefixes."""
    rows = [r for r in map(json.loads, Path("data/demo/problems.jsonl").open()) if r.get("cot")]
    rows = rows[:4]
    cfg = TruncateSection(verdict="score")
    lockstep = truncate_rows(rows, engine, cfg.model_copy(update={"search": "lockstep"}))
    srv = EngineServer(engine, max_in_flight=4)
    try:
        per_row = truncate_rows(rows, GuardedEngine(srv), cfg)
    finally:
        srv.stop()
    for a, b in zip(lockstep, per_row):
        assert [p["k"] for p in a.record["probes"]] == [p["k"] for p in b.record["probes"]]
        assert [p["score"] for p in b.record["probes"]] == pytest.approx(
            [p["score"] for p in a.record["probes"]], abs=1e-4)
        assert a.record["prefix"] == b.record["prefix"]


def test_per_row_search_admits_rows_within_the_kv_budget(vllm: Backend) -> None:
    """With a KV budget that holds about two rows' longest prompts, rows wait to be admitted:
    the tokens reserved never pass the budget, and the prefixes are those of lockstep."""
    rows = [r for r in map(json.loads, Path("data/demo/problems.jsonl").open()) if r.get("cot")]
    rows = rows[:5]
    cfg = TruncateSection(verdict="score")
    lockstep = truncate_rows(rows, vllm, cfg.model_copy(update={"search": "lockstep"}))
    srv = EngineServer(vllm, max_in_flight=8)
    assert srv.kv_budget and srv.kv_budget > 10_000  # vLLM's KV cache, 1 GiB here
    srv.kv_budget = 2_000
    try:
        per_row = truncate_rows(rows, GuardedEngine(srv), cfg)
        stats = srv.stats()
    finally:
        srv.stop()
    assert 0 < stats["peak_reserved"] <= 2_000
    assert [o.record["prefix"] for o in per_row] == [o.record["prefix"] for o in lockstep]


def test_async_llm_driver_answers_as_the_step_driver(vllm: Backend, model_path: str) -> None:
    """engine.vllm_driver: async_llm serves through vLLM's AsyncLLM (engine core in a child
    process): same greedy texts, label scores and chosen prefixes as the default driver, and a
    too-long prompt still fails alone."""
    spec = _spec(model_path, "vllm").model_copy(update={"vllm_driver": "async_llm"})
    engine = build_engine(spec)
    srv = EngineServer(engine, max_in_flight=8)
    try:
        assert srv.coroutines and srv.kv_budget
        greedy = Sampling(max_tokens=12)
        chats = [chat(q) for q in QUESTIONS]
        assert [c.text for c in srv.generate(chats, greedy)] == \
            [c.text for c in vllm.generate(chats, greedy)]
        out = srv.generate([chat("word " * 2000)], greedy)
        assert out[0].error and "max_model_len" in out[0].error
        rows = [r for r in map(json.loads, Path("data/demo/problems.jsonl").open())
                if r.get("cot")][:3]
        cfg = TruncateSection(verdict="score")
        lockstep = truncate_rows(rows, vllm, cfg.model_copy(update={"search": "lockstep"}))
        per_row = truncate_rows(rows, GuardedEngine(srv), cfg)
        assert [o.record["prefix"] for o in per_row] == [o.record["prefix"] for o in lockstep]
        assert srv.stats()["peak_in_flight"] > 1
    finally:
        srv.close()
