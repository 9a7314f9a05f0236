"""Failures on a real local Ray with SmolLM2 on vLLM's CPU build: an engine process killed
mid-batch loses no row and rejects none; a poison row (its prompt makes the engine's process
exit: the stage's engine is ``faulty_engines.PoisonVLLM``, from tests/support) is rejected
after the bounded retries while every other row completes; a stage over its
``max_reject_share`` exits non-zero; a rerun retries ``system`` rejects and keeps ``row``
rejects."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from faulty_engines import POISON

from palign.cli import main as palign_main
from palign.config import parse_config
from palign.data import fingerprint
from palign.data.shards import ShardWriter, read_rows, reject_row
from palign.pipeline import run_pipeline
from palign.runtime.environment import actor_log_dir
from palign.runtime.fingerprints import row_stage_fingerprints

pytestmark = [pytest.mark.ray, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[2]
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]
WITH_COT = [r for r in DEMO if r.get("cot")]


def truncate_config(tmp: Path, rows: list[dict], **over) -> dict:
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "run": {"output_dir": str(tmp / "out"), "stages": ["truncate"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(tmp / "data.jsonl")},
        "models": {"student": "smollm2-135m"},
        "engine": {"backend": "vllm", "dtype": "float32", "max_model_len": 2048,
                   "batch_size": 2, "cpus_per_replica": 2, "cpu_kv_cache_gib": 1},
        "output": {"shard_rows": 1},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def ids(folder: Path) -> Counter:
    return Counter(r["id"] for r in read_rows(folder))


def actor_logs(stage: str) -> dict[int, Path]:
    """The engine actors' log files of this Ray session (``actor_log_dir``), by process id."""
    return {int(p.stem.rsplit("-", 1)[1]): p
            for p in actor_log_dir().glob(f"palign-{stage}-*.log")}


def test_engine_killed_mid_batch_loses_no_row_and_rejects_none(tmp_path, ray_cluster):
    rows = WITH_COT[:6]
    # One batch in the actor at a time (max_in_flight = batch_size): the kill then lands in a
    # batch's whole run, not in the moment between overlapped batches that land together (the
    # poison-row test below covers a crash with overlapped batches in flight).
    cfg = parse_config(truncate_config(tmp_path, rows, engine={"max_in_flight": 2}))
    out = tmp_path / "out" / "truncate"
    before = set(actor_logs("truncate"))
    killed: list[int] = []

    def kill_mid_batch() -> None:
        # Once a first batch's shard has landed, and the actor's log shows more batches begun
        # than have landed (rows in flight right now), kill that actor.
        deadline = time.time() + 300
        while time.time() < deadline:
            fresh = sorted(set(actor_logs("truncate")) - before)
            landed = len(list(out.glob("part-*")))
            if fresh and landed:
                begun = actor_logs("truncate")[fresh[-1]].read_text().count("in flight: ")
                if begun > landed:
                    os.kill(fresh[-1], signal.SIGKILL)
                    killed.append(fresh[-1])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_batch, daemon=True)
    killer.start()
    summary = run_pipeline(cfg)[-1]
    killer.join(timeout=10)

    assert killed, "the engine actor was not found to kill"
    assert ids(out) == Counter({r["id"]: 1 for r in rows})  # none lost, none twice
    assert summary.rejected == 0 and not list(read_rows(out / "rejects"))
    restarted = set(actor_logs("truncate")) - before - set(killed)
    assert restarted, "no new engine actor started after the kill"
    text = "".join(actor_logs("truncate")[pid].read_text() for pid in restarted)
    assert "in flight when an earlier attempt died" in text  # the ledger saw the crash


def test_poison_row_is_rejected_after_bounded_retries_and_the_rest_completes(tmp_path,
                                                                              ray_cluster):
    poison = {"id": "poison", "question": f"What is 1 + 1? {POISON}", "answer": "2",
              "cot": "We add one and one. That makes two. So the answer is 2."}
    rows = [WITH_COT[0], poison, *WITH_COT[1:4]]
    cfg = parse_config(truncate_config(tmp_path, rows, truncate={
        "max_row_attempts": 2, "engine": {"backend": "faulty_engines:PoisonVLLM"}}))
    summary = run_pipeline(cfg)[-1]

    out = tmp_path / "out" / "truncate"
    assert ids(out) == Counter({r["id"]: 1 for r in rows if r["id"] != "poison"})
    (reject,) = list(read_rows(out / "rejects"))
    assert reject["id"] == "poison" and reject["kind"] == "system"
    assert "the engine failed 2 times while serving this row" in reject["reason"]
    assert summary.rejected == 1 and summary.rows_out == 4


def test_stage_over_its_reject_share_exits_non_zero(tmp_path, ray_cluster, capsys):
    # strategy "full" needs no judge; rows without a CoT have nothing to truncate.
    rows = [WITH_COT[0]] + [{"id": f"no-cot-{i}", "question": "Q?", "answer": "1"}
                            for i in range(3)]
    raw = truncate_config(tmp_path, rows, truncate={"strategy": "full"})
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(raw))
    assert palign_main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: truncate rejected 3 of 4 rows (75%), over truncate.max_reject_share=0.5" in err
    assert "3 x 'no CoT to truncate" in err
    out = tmp_path / "out" / "truncate"
    assert ids(out) == Counter({WITH_COT[0]["id"]: 1})  # what it had was written first
    assert len(list(read_rows(out / "rejects"))) == 3


def test_rerun_retries_system_rejects_and_keeps_row_rejects(tmp_path, ray_cluster):
    rows = WITH_COT[:4]
    cfg = parse_config(truncate_config(tmp_path, rows, truncate={"strategy": "full"}))
    out = tmp_path / "out" / "truncate"
    # As an earlier run of this config left it: one row rejected for a crash, one for its own
    # fault (and the fingerprint it ran under).
    fingerprint.write(str(out), row_stage_fingerprints(cfg, ["truncate"])["truncate"])
    ShardWriter(out / "rejects").write([
        reject_row(rows[0]["id"], "truncate", "the engine failed 3 times", rows[0], "system"),
        reject_row(rows[1]["id"], "truncate", "prompt too long", rows[1], "row"),
    ])
    summary = run_pipeline(cfg)[-1]
    assert summary.skipped == 1  # only the row reject counted as done
    assert ids(out) == Counter({r["id"]: 1 for r in (rows[0], rows[2], rows[3])})
    assert ids(out / "rejects") == Counter({rows[1]["id"]: 1})
    assert ids(out / "rejects_retried") == Counter({rows[0]["id"]: 1})
    again = run_pipeline(parse_config(truncate_config(
        tmp_path, rows, truncate={"strategy": "full"}, run={"retry_rejects": "all"})))[-1]
    assert again.processed == 1  # the row reject, served again on request
    assert ids(out) == Counter({r["id"]: 1 for r in rows})
    assert not list(read_rows(out / "rejects"))


def test_a_model_that_does_not_load_fails_the_stage_and_rejects_nothing(tmp_path, ray_cluster,
                                                                        capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    raw = truncate_config(tmp_path, WITH_COT[:2], models={"student": str(broken)},
                          engine={"backend": "transformers", "max_failures": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(raw))
    assert palign_main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: truncate failed after 0 of 2 rows were written" in err
    assert "no-such-architecture" in err  # the loader's own words
    out = tmp_path / "out" / "truncate"
    assert not list(read_rows(out)) and not list(read_rows(out / "rejects"))


def test_a_stopped_engine_actor_is_killed_past_the_time_limit_and_its_row_counted(tmp_path,
                                                                                   ray_cluster):
    # An engine actor SIGSTOPped with a row in flight cannot time itself out: the stage's
    # watchdog kills it once it has given no sign of life for engine.request_timeout_s, Ray
    # restarts it, and the ledger counts the row's attempt (max_row_attempts=1: a system reject).
    limit = 15  # over any sound probe's time, on this machine under load, a few times over
    rows = [{"id": f"short-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
             "cot": f"We add {i} and 1. That makes {i + 1}. So the answer is {i + 1}."}
            for i in range(3)]  # short prompts: cheap probes
    cfg = parse_config(truncate_config(
        tmp_path, rows, truncate={"max_row_attempts": 1},
        engine={"backend": "transformers", "batch_size": 1, "max_in_flight": 1,
                "request_timeout_s": limit}))
    out = tmp_path / "out" / "truncate"
    before = set(actor_logs("truncate"))
    stopped: list[tuple[int, str, float]] = []  # pid, the row in flight, when
    done = threading.Event()

    def stop_mid_row() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not stopped:
            for pid in sorted(set(actor_logs("truncate")) - before):
                begun = [line.rsplit("in flight: ", 1)[1].strip()
                         for line in actor_logs("truncate")[pid].read_text().splitlines()
                         if "in flight: " in line]
                landed = len(list(out.glob("part-*"))) + len(list(out.glob("rejects/part-*")))
                if len(begun) > landed:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append((pid, begun[-1], time.monotonic()))
                    break
            time.sleep(0.05)
        # Without the watchdog the stage would wait for ever: end it (as a crash) for the
        # assertions below to fail by name.
        if stopped and not done.wait(limit + 90):
            os.kill(stopped[0][0], signal.SIGKILL)

    stopper = threading.Thread(target=stop_mid_row, daemon=True)
    stopper.start()
    try:
        summary = run_pipeline(cfg)[-1]
    finally:
        done.set()
    ended = time.monotonic()
    stopper.join(timeout=10)

    assert stopped, "no engine actor was found with a row in flight"
    pid, row, at = stopped[0]
    assert ended - at < limit + 60  # the time limit, the watchdog's look, a restart, 2 rows
    assert not Path(f"/proc/{pid}").exists()  # the stopped process was killed
    assert ids(out) + ids(out / "rejects") == Counter({r["id"]: 1 for r in rows})
    (reject,) = list(read_rows(out / "rejects"))
    assert reject["id"] == row and reject["kind"] == "system"
    assert "no sign of life" in reject["reason"]
    assert f"engine.request_timeout_s={limit} s" in reject["reason"]
    assert summary.rejected == 1 and summary.rows_out == 2
