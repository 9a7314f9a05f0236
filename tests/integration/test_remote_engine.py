"""generate on a remote OpenAI-compatible engine (``engine.backend: openai``) through the real
runner on the suite's local Ray, against the in-process stub server of tests/support (the same
flow against vLLM's own server is tests/e2e's): the rows go through the same actor pool,
shards, rejects and summary as a local engine's, on CPU actors that load no model.

- a 429 (with Retry-After) is retried, and the summary counts it;
- a 400 for one row makes that row a ``row`` reject naming the status; the rest complete;
- the API key, read by the actors from the variable ``engine.api_key_env`` names, reaches the
  server and appears in no file under the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply

from palign.config import parse_config
from palign.data.shards import read_rows
from palign.pipeline import run_pipeline

pytestmark = [pytest.mark.ray]
OPENAI_KEY_ENV = "PALIGN_TEST_OPENAI_KEY"  # set with a made-up key by tests/conftest.py

ROWS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}
        for i in range(6)] + [{"id": "poison", "question": "POISON-400: what is 1 + 1?",
                               "answer": "2"}]


def test_generate_on_a_remote_engine_retries_rejects_the_rows_fault_and_keeps_the_key_out(
        tmp_path: Path, ray_cluster) -> None:
    key = os.environ[OPENAI_KEY_ENV]

    throttled = []

    def rule(n: int, body: dict) -> Reply | None:
        if "POISON-400" in json.dumps(body["messages"]):
            return Reply(400, "this request is malformed")
        if len(throttled) < 2 and n % 2 == 0:  # two 429s, each retried
            throttled.append(n)
            return Reply(429, "slow down", retry_after="0")
        return None

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with FakeOpenAI(models=["teacher-on-server"], key=key, rule=rule) as server:
        cfg = parse_config({
            "run": {"output_dir": str(tmp_path / "out"), "stages": ["generate"]},
            "ray": {"progress_bars": False},
            "data": {"path": str(data)},
            "models": {"teacher": "teacher-on-server", "student": "smollm2-135m"},
            "generate": {"sampling": {"max_tokens": 16},
                         "engine": {"backend": "openai", "base_url": server.url,
                                    "api_key_env": OPENAI_KEY_ENV, "max_concurrency": 2,
                                    "batch_size": 2, "cpus_per_replica": 0.5,
                                    "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05}},
        })
        summary = run_pipeline(cfg)[-1]
    out = tmp_path / "out"
    done = {r["id"]: r for r in read_rows(out / "generate")}
    assert sorted(done) == sorted(r["id"] for r in ROWS if r["id"] != "poison")
    assert all(r["cot_source"] == "teacher" and r["cot"] for r in done.values())
    rejects = list(read_rows(out / "generate/rejects"))
    assert [(r["id"], r["kind"]) for r in rejects] == [("poison", "row")]
    assert "400" in rejects[0]["reason"] and "malformed" in rejects[0]["reason"]
    assert server.statuses[429] == 2
    saved = json.loads((out / "generate/_SUMMARY.json").read_text())
    assert saved["engine"]["retries"] == 2 == summary.engine["retries"]
    assert saved["engine"]["completion_tokens"] == sum(r["teacher_tokens"] for r in done.values())
    assert set(server.auth) == {f"Bearer {key}"}  # every request carried it ...
    for path in out.rglob("*"):  # ... and no file of the run holds it
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
