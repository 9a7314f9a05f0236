"""Stopping a run by signal (``palign.runtime.signals``): SIGTERM (``ray job stop``, a pod's
shutdown) and SIGINT (Ctrl-C) end a run the same way, with 143 or 130, the lock released and the
committed work kept, so that a rerun starts at once and resumes.

- A real ``palign run`` (its own local Ray, a real engine) is sent SIGTERM after its stage's
  first commit: it exits 143 at once, with one line and without Ray's stack dump, leaves no
  lock, keeps what it committed, and a rerun starts and completes with every id once.
- The lock's part, without Ray: either signal while the lock is held releases it; one that
  lands while the lock is being taken on object storage waits until it is taken, then releases
  it (no lock left for the next run to wait out); and a lock lost to another run still ends
  the run with ``LockLost`` (its heartbeat stops the run with SIGINT), not as a stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from s3_server import BUCKET

from palign.config import load_config
from palign.data import storage
from palign.data.runlock import LOCK_NAME, RunLock
from palign.data.shards import read_rows

ROOT = Path(__file__).resolve().parents[2]
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]

# A driver as the command runs one (palign.cli): the lock held under palign's handlers, a stop
# mapped to its exit status. It prints "held" once the lock is, then waits to be signalled.
HOLDER = """
import sys, time
from palign.data.runlock import LockLost, RunLock
from palign.runtime.signals import Stopped, shielded, stop_on_signals
try:
    with stop_on_signals(), shielded(RunLock(sys.argv[1], stale_s=float(sys.argv[2]),
                                             heartbeat_s=0.1)):
        print("held", flush=True)
        time.sleep(60)
except Stopped as stop:
    print(f"stopped by {stop.name}", flush=True)
    sys.exit(stop.exit_code)
except LockLost:
    print("lock lost", flush=True)
    sys.exit(1)
print("went on", flush=True)
"""


def holder(folder: str, stale_s: float = 60.0, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, folder, str(stale_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_either_signal_stops_the_holder_and_releases_its_lock(tmp_path, signum, code):
    proc = holder(str(tmp_path))
    assert proc.stdout.readline().strip() == "held"
    assert (tmp_path / LOCK_NAME).exists()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in out and "went on" not in out
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_lost_to_another_run_still_fails_the_run(tmp_path):
    """The heartbeat's SIGINT, sent when another run took the lock over, must end the run as
    LockLost (a failure, exit 1), not as a stop by the user."""
    proc = holder(str(tmp_path), stale_s=1.0)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGSTOP)  # a frozen driver: its heartbeat stops
    try:
        time.sleep(1.5)
        taker = RunLock(tmp_path, stale_s=1.0, heartbeat_s=0.1)
        taker.acquire()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "lock lost" in out, (out, err[-2000:])
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == taker.token
    finally:
        taker.release()


def test_sigterm_while_the_lock_on_s3_is_being_taken_leaves_no_lock(s3):
    """Signalled as soon as its lock object exists (while it is still making sure of it), the
    driver finishes taking it, releases it and stops: no lock is left on the bucket to refuse
    the next run (from another host) for run.lock_stale_s."""
    folder = f"s3://{BUCKET}/signals-{time.time_ns()}"
    lock = f"{folder}/{LOCK_NAME}"
    proc = holder(folder, env=s3)
    deadline = time.monotonic() + 60
    while not storage.exists(lock):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err[-2000:])
    assert not storage.exists(lock)
    start = time.monotonic()
    with RunLock(folder, stale_s=600):  # the next run starts at once
        pass
    assert time.monotonic() - start < 30


def generate_config(tmp: Path, model: str, n: int, address: str) -> Path:
    """generate with a tiny random model as teacher on the transformers engine: one row per
    batch and per commit, so the run is signalled midway; on the Ray cluster at ``address``,
    as a Ray job's driver is."""
    rows = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in DEMO[:n]]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "run": {"name": "signals", "output_dir": str(tmp / "out"), "stages": ["generate"]},
        "ray": {"progress_bars": False, "address": address},
        "data": {"path": str(tmp / "data.jsonl")},
        "models": {"teacher": model, "student": model},
        "engine": {"backend": "transformers", "dtype": "float32", "max_model_len": 512,
                   "batch_size": 1, "max_in_flight": 1, "cpus_per_replica": 1},
        "generate": {"sampling": {"max_tokens": 32}, "min_cot_chars": 1},
        "output": {"shard_rows": 1},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ids(folder: Path) -> Counter:
    return Counter(r["id"] for r in [*read_rows(folder), *read_rows(folder / "rejects")])


def committed(folder: Path) -> bool:
    return any(p.name.startswith("part-") for index in (folder / "_index",
                                                        folder / "rejects/_index")
               if index.is_dir() for p in index.iterdir())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigterm_to_a_running_driver_stops_it_and_a_rerun_resumes_at_once(
        ray_cluster, tiny_model, tmp_path):
    import ray

    from palign.pipeline import run_pipeline

    n = 4
    cfg_path = generate_config(tmp_path, tiny_model, n, ray.get_runtime_context().gcs_address)
    out = tmp_path / "out"
    err_log = tmp_path / "stderr.log"
    with open(err_log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "palign.cli", "run", str(cfg_path)],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 200
        while not committed(out / "generate"):
            assert proc.poll() is None, err_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no commit yet"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=60)
    stopped_in = time.monotonic() - sent
    log = err_log.read_text()
    assert proc.returncode == 143, log[-3000:]
    assert stopped_in < 30, stopped_in
    assert ("stopped by SIGTERM: committed work is kept; run the same command to resume"
            in log.splitlines()), log[-3000:]
    assert "SIGTERM received" not in log  # Ray's crash handler's stack dump
    assert not (out / LOCK_NAME).exists()
    kept = ids(out / "generate")
    assert 0 < sum(kept.values()) < n and set(kept.values()) == {1}, kept

    summary = run_pipeline(load_config(cfg_path))[-1]  # not refused: the lock is free
    assert summary.stage == "generate" and summary.skipped == sum(kept.values())
    assert ids(out / "generate") == Counter({r["id"]: 1 for r in DEMO[:n]})
    assert not (out / LOCK_NAME).exists()
