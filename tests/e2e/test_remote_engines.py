"""generate with a remote teacher (``engine.backend: openai``) against vLLM's own
OpenAI-compatible server on SmolLM2 (fixture ``openai_server``, started once per session),
through a fault proxy in front of it (``fake_openai.FakeOpenAI`` with ``upstream``), on the
suite's Ray with the real runner: what a user's ``vllm serve`` or provider puts a run through.

- A proxy that answers 429 to one chat request in 5 and 500 to one in 10, and 400 to the row
  whose question holds a marker: every other id is written once, that row is a ``row`` reject
  with the status and the server's message, the summary counts each retry and the tokens the
  records hold, and the key (made up, set by conftest) reached the server on every request but
  shows in no file of the run, no file of Ray's logs, and nothing the driver printed or logged.
- An endpoint that goes silent mid-run: the run fails within a bound set by the engine's limits,
  naming the URL, and rejects none of the rows it held; a rerun pointed at a working endpoint
  (``engine.base_url`` is operational: the run resumes) serves only the rows not yet written.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI, Reply

from palign.common.failures import StageFailed
from palign.config import parse_config
from palign.data.shards import read_rows
from palign.pipeline import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.model]

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "problems.jsonl"
POISON = "POISON-400"
ROWS = 16
MAX_TOKENS = 24
FAIL_WITHIN_S = 90  # the silent endpoint's run, from its start to the StageFailed


def _problems(tmp_path: Path, poison: bool) -> tuple[Path, list[dict[str, Any]]]:
    """The demo's first ROWS problems without their CoT (the teacher writes it), plus a row
    the proxy refuses."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:ROWS]]
    rows = [{k: v for k, v in r.items() if k != "cot"} for r in rows]
    if poison:
        rows.append({"id": "poison", "question": f"{POISON}: what is 1 + 1?", "answer": "2"})
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _config(tmp_path: Path, data: Path, model: str, key_env: str, url: str,
            **engine: Any) -> Any:
    return parse_config({
        "run": {"output_dir": str(tmp_path / "out"), "stages": ["generate"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(data)},
        "models": {"teacher": model, "student": "smollm2-135m"},
        "generate": {"sampling": {"max_tokens": MAX_TOKENS, "seed": 0},
                     "engine": {"backend": "openai", "base_url": url, "api_key_env": key_env,
                                "max_concurrency": 4, "batch_size": 4,
                                "cpus_per_replica": 0.5, **engine}},
    })


def _asked(chat: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The id of the row a chat request asks about."""
    text = json.dumps(chat["messages"])
    (row_id,) = [r["id"] for r in rows if json.dumps(r["question"])[1:-1] in text]
    return row_id


def _holding(folder: Path, needle: bytes) -> list[str]:
    """The files under ``folder`` that hold ``needle`` (files that vanish while read: none)."""
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:
            continue
    return found


def test_generate_through_a_faulty_proxy_retries_rejects_the_row_and_keeps_the_key_out(
        tmp_path: Path, ray_cluster, openai_server, capfd, caplog) -> None:
    url, model, key_env = openai_server.url, openai_server.model, openai_server.key_env
    key = os.environ[key_env]
    caplog.set_level(logging.INFO)

    def rule(n: int, body: dict[str, Any]) -> Reply | None:
        if POISON in json.dumps(body["messages"]):
            return Reply(400, "the proxy refuses this question")
        if n % 5 == 0:
            return Reply(429, "slow down", retry_after="0")
        if n % 10 == 3:
            return Reply(500, "the proxy had a bad moment")
        return None

    data, rows = _problems(tmp_path, poison=True)
    with FakeOpenAI(upstream=url, rule=rule) as proxy, openai_server.serving():
        summary = run_pipeline(_config(tmp_path, data, model, key_env, proxy.url,
                                       retry_backoff_s=0.05, retry_backoff_max_s=0.2))[-1]
    out = tmp_path / "out"
    written = [r["id"] for r in read_rows(out / "generate")]
    assert collections.Counter(written) == {r["id"]: 1 for r in rows if r["id"] != "poison"}
    done = list(read_rows(out / "generate"))
    assert all(r["cot_source"] == "teacher" and r["cot"] and r["teacher_model"] == model
               for r in done)
    rejects = list(read_rows(out / "generate/rejects"))
    assert [(r["id"], r["kind"]) for r in rejects] == [("poison", "row")]
    assert "400" in rejects[0]["reason"] and "refuses this question" in rejects[0]["reason"]

    faults = proxy.statuses[429] + proxy.statuses[500]
    assert proxy.statuses[429] >= 2 and proxy.statuses[500] >= 1, proxy.statuses
    saved = json.loads((out / "generate/_SUMMARY.json").read_text())
    assert saved["engine"]["retries"] == faults == summary.engine["retries"]
    assert saved["engine"]["requests"] == len(proxy.chats)  # every attempt, refused or not
    assert saved["engine"]["completion_tokens"] == sum(r["teacher_tokens"] for r in done) > 0

    # The key went to the server on every request (vLLM answers 401 without it) ...
    assert set(proxy.auth) == {f"Bearer {key}"}
    # ... and nowhere else: not in the run's files, Ray's logs, or what the driver showed.
    import ray

    assert _holding(out, key.encode()) == []
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    assert _holding(logs, key.encode()) == []
    printed = capfd.readouterr()
    assert key not in printed.out and key not in printed.err
    assert key not in caplog.text
    assert all(key not in r.getMessage() for r in caplog.records)


def test_an_endpoint_that_goes_silent_fails_the_run_and_a_rerun_elsewhere_resumes(
        tmp_path: Path, ray_cluster, openai_server) -> None:
    url, model, key_env = openai_server.url, openai_server.model, openai_server.key_env
    data, rows = _problems(tmp_path, poison=False)
    out = tmp_path / "out"
    # Two batches of 4 answered and written, then nothing answers: the rows in flight time
    # out (2 attempts of 5 s each: room for a busy CPU server's answers before), the actor
    # ends, Ray restarts it, and its probe of GET /models times out the same way; one engine
    # failure is the limit here (max_failures), so the stage fails then: about 35 s in all.
    limits = {"request_timeout_s": 5, "max_retries": 1, "retry_backoff_s": 0.05,
              "retry_backoff_max_s": 0.2, "max_failures": 1}
    with FakeOpenAI(upstream=url, silent_after=8) as silent, openai_server.serving():
        started = time.monotonic()
        with pytest.raises(StageFailed) as failed:
            run_pipeline(_config(tmp_path, data, model, key_env, silent.url, **limits))
        took = time.monotonic() - started
    assert took < FAIL_WITHIN_S, took
    assert silent.url in str(failed.value)
    assert silent.held > 0
    first = collections.Counter(r["id"] for r in read_rows(out / "generate"))
    assert first and set(first.values()) == {1} and len(first) < len(rows), first
    assert list(read_rows(out / "generate/rejects")) == []  # the rows it held: none rejected
    # what the message counts is what is on disk (batches committed that never reached the
    # driver included): what the rerun will skip
    assert f"{len(first)} of {ROWS} rows were written" in str(failed.value), failed.value

    # The limits and the URL are operational (not in the fingerprint): the rerun resumes.
    with FakeOpenAI(upstream=url) as working, openai_server.serving():
        summary = run_pipeline(_config(tmp_path, data, model, key_env, working.url))[-1]
    written = collections.Counter(r["id"] for r in read_rows(out / "generate"))
    assert written == {r["id"]: 1 for r in rows}
    assert list(read_rows(out / "generate/rejects")) == []
    assert summary.skipped == len(first)
    asked = collections.Counter(_asked(chat, rows) for chat in working.chats)
    assert asked == {r["id"]: 1 for r in rows if r["id"] not in first}
