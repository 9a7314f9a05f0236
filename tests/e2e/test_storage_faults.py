"""Faults of storage, on real storage: the suite's S3-compatible server behind a proxy that
answers 503 SlowDown (with S3's XML error body) to some requests, and an output folder on a
small tmpfs that fills up.

- A throttling store: every call is tried again (``palign.data.retrying``), reads inside an
  open file included (the AWS SDK itself never retries a 503 answered to a small ranged read);
  a call that keeps failing raises ``StorageUnavailable`` after its bounded tries.
- The worker's batch write that fails through those retries exits the actor for Ray to retry
  the batch, never rejects a row, and fails the stage after ``engine.max_failures`` such
  failures in a row, naming the folder (in-process here: the exit is a ``MachineryError``).
- A whole stage (``truncate`` with ``strategy: fixed_ratio``: no engine, but the real path of
  every row through the stage's actor pool and the worker's writes and commits) completes on a
  store that throttles one request in 20, every id once; on a full disk it fails naming the
  folder, commits nothing partial, and a rerun after space is freed completes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from s3_proxy import SLOW_DOWN, S3Proxy, slow_down_every
from s3_server import BUCKET

from palign.common.failures import (
    DiskFull,
    MachineryError,
    StageFailed,
    StorageUnavailable,
    is_machinery,
)
from palign.config import parse_config
from palign.data import retrying, storage
from palign.data.digest import read_index
from palign.data.shards import read_rows, write_shard

ROOT = Path(__file__).resolve().parents[2]
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]
WITH_COT = [r for r in DEMO if r.get("cot")]


def truncate_config(output_dir: str, data: str, **over: dict) -> dict:
    raw = {
        "run": {"output_dir": output_dir, "stages": ["truncate"]},
        "ray": {"progress_bars": False, "num_cpus": 2},
        "data": {"path": data},
        "models": {"student": "smollm2-135m"},
        "truncate": {"strategy": "fixed_ratio", "ratio": 0.5,
                     "engine": {"batch_size": 1, "cpus_per_replica": 1}},
        "output": {"shard_rows": 1},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def ids(folder: str | Path) -> Counter:
    """Every id in a stage's output and rejects, with how often it is there."""
    return Counter(r["id"] for r in [*read_rows(folder), *read_rows(f"{folder}/rejects")])


@pytest.fixture
def through(s3, monkeypatch):
    """``through(rule)``: this process reaches the S3 server through a proxy that answers by
    ``rule`` (``s3_proxy``); storage's cached clients are dropped before and after."""
    proxies: list[S3Proxy] = []

    def start(rule) -> S3Proxy:
        proxy = S3Proxy(s3["AWS_ENDPOINT_URL_S3"], rule)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        storage._filesystem.cache_clear()
        return proxy

    yield start
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["AWS_ENDPOINT_URL_S3"])
    storage._filesystem.cache_clear()
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def quick_retries(monkeypatch):
    """palign's retries, fewer and with short pauses (the same rules)."""
    monkeypatch.setattr(retrying, "ATTEMPTS", 3)
    monkeypatch.setattr(retrying, "BASE_S", 0.01)
    monkeypatch.setattr(retrying, "CAP_S", 0.04)


# -- which errors pass ------------------------------------------------------------------------

def test_transient_storage_errors_are_told_from_lasting_ones():
    passing = [
        OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
        OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response "
                "stream (eof: 0, bad: 1)"),  # a 503 answered to a small ranged read
        OSError("AWS Error SERVICE_UNAVAILABLE during HeadObject operation: HTTP 503"),
        OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 28, "
                "Timeout was reached"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
    ]
    lasting = [
        FileNotFoundError(errno.ENOENT, "Path does not exist 'b/k'"),
        PermissionError("AWS Error ACCESS_DENIED during PutObject operation: HTTP 403"),
        OSError("AWS Error NO_SUCH_BUCKET during HeadBucket operation: 404 Not Found"),
        OSError(errno.ENOSPC, "No space left on device"),
        StorageUnavailable("s3://b/k: the store kept failing"),  # already retried
        ValueError("503"),  # not a storage error
    ]
    assert [retrying.transient(e) for e in passing] == [True] * len(passing)
    assert [retrying.transient(e) for e in lasting] == [False] * len(lasting)
    assert is_machinery(StorageUnavailable("x")) and isinstance(StorageUnavailable("x"), OSError)
    assert isinstance(DiskFull("x"), StageFailed) and not is_machinery(DiskFull("x"))


# -- a throttling store, call by call -----------------------------------------------------------

def test_reads_inside_open_files_are_tried_again_on_a_throttling_store(through, quick_retries):
    """Every other GET of each object refused, the first one included (counted per object:
    reads on two threads would otherwise share one count, and one read could meet refusals in a
    row). The S3 client retries a refused request itself, except a 503 answered to a small ranged
    read (its XML body does not fit the read's buffer): palign tries those again, reads inside
    an open file included (the shard readers' Parquet indexes). A missing object is still
    FileNotFoundError at once."""
    base = f"s3://{BUCKET}/flaky-{time.time_ns()}"
    for i in range(2):
        storage.write_text(f"{base}/small-{i}.txt", f"v{i}")
        write_shard(f"{base}/out", f"part-{i}", [{"id": f"r{i}", "n": i}], "parquet")
    gets = Counter()

    def every_other_get(number, method, path):
        if method != "GET":
            return None
        gets[path] += 1
        return SLOW_DOWN if gets[path] % 2 == 1 else None

    proxy = through(every_other_get)
    assert [storage.read_text(f"{base}/small-{i}.txt") for i in range(2)] == ["v0", "v1"]
    assert sorted(read_index(f"{base}/out")["id"].to_pylist()) == ["r0", "r1"]
    assert sorted(r["id"] for r in read_rows(f"{base}/out")) == ["r0", "r1"]
    assert proxy.counts["refused"] >= 4
    before = proxy.counts["forwarded"]
    with pytest.raises(FileNotFoundError):
        storage.read_text(f"{base}/none.txt")
    assert proxy.counts["forwarded"] - before == 1  # asked once, not tried again


def test_a_store_that_stays_down_fails_a_call_after_bounded_tries(through, quick_retries):
    proxy = through(lambda n, method, path: SLOW_DOWN)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"reading|looking up|opening") as err:
        storage.read_text(f"s3://{BUCKET}/down.txt")
    assert f"s3://{BUCKET}/down.txt" in str(err.value)
    assert f"{retrying.ATTEMPTS} tries" in str(err.value)
    # palign's tries, each of them the S3 client's own tries: bounded, and quick here
    assert proxy.counts["refused"] <= retrying.ATTEMPTS * retrying.S3_ATTEMPTS
    assert time.monotonic() - start < 30


# -- the worker's batch write -------------------------------------------------------------------

def test_a_batch_write_failing_through_the_retries_is_retried_then_fails_the_stage(
        through, quick_retries, monkeypatch, tmp_path):
    """Writes refused (S3 throttles writes first): the batch is retried, never rejected; the
    third failure in a row fails the stage naming the folder; once writes go through, the
    same batch commits, and the count starts again."""
    from palign.runtime.spec import WorkerSpec
    from palign.runtime.worker import StageWorker

    monkeypatch.setattr(retrying, "S3_ATTEMPTS", 1)  # the client's own tries off: quicker
    out = f"s3://{BUCKET}/writes-{time.time_ns()}"
    cfg = parse_config(truncate_config(out, str(tmp_path / "unused.jsonl")))
    writes_down = {"on": True}
    through(lambda n, method, path: SLOW_DOWN
            if writes_down["on"] and method in ("PUT", "POST", "DELETE") else None)
    worker = StageWorker(WorkerSpec.of(cfg, "truncate"))
    batch = {"record": [json.dumps(r) for r in WITH_COT[:2]]}
    for _ in range(2):  # an actor in Ray exits here; Ray restarts it and retries the batch
        with pytest.raises(MachineryError, match="writing a batch to .* failed after storage"):
            worker(batch)
    with pytest.raises(StageFailed) as failed:
        worker(batch)
    assert f"writing to {out}/truncate failed 3 times in a row" in str(failed.value)
    assert "engine.max_failures" in str(failed.value)
    assert not ids(f"{out}/truncate")  # nothing committed, nothing rejected
    writes_down["on"] = False
    assert worker(batch)["ok"] == [2]
    assert ids(f"{out}/truncate") == Counter({r["id"]: 1 for r in WITH_COT[:2]})
    writes_down["on"] = True  # after a good write, a failure is retried again
    with pytest.raises(MachineryError):
        worker({"record": [json.dumps(WITH_COT[2])]})


# -- whole stages ---------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_stage_on_a_store_that_throttles_one_request_in_20_completes(s3, tmp_path):
    """``palign run`` in a process of its own (its Ray workers reach the store through the
    proxy): the stage completes, every id exactly once, though one request in 20 was
    refused."""
    rows = WITH_COT[:4]
    base = f"s3://{BUCKET}/throttled-{time.time_ns()}"
    storage.write_text(f"{base}/data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(truncate_config(f"{base}/out", f"{base}/data.jsonl")))
    with S3Proxy(s3["AWS_ENDPOINT_URL_S3"], slow_down_every(20)) as proxy:
        env = {**os.environ, **s3, "AWS_ENDPOINT_URL_S3": proxy.url, "PYTHONUNBUFFERED": "1"}
        done = subprocess.run([sys.executable, "-m", "palign.cli", "run", str(cfg)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    assert proxy.counts["refused"] >= 5, proxy.counts  # the store did throttle, often
    assert ids(f"{base}/out/truncate") == Counter({r["id"]: 1 for r in rows})
    assert all(r["strategy"] == "fixed_ratio" for r in read_rows(f"{base}/out/truncate"))


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (skips the test where mounting is not
    permitted), unmounted at the end."""
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    try:
        got = subprocess.run(command, capture_output=True, text=True, timeout=30)
        problem = got.stderr.strip() if got.returncode else None
    except OSError as err:
        problem = str(err)
    if problem is not None:
        pytest.skip(f"needs to mount a small tmpfs (root, or CAP_SYS_ADMIN in a container): "
                    f"`{' '.join(command)}` failed: {problem}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_full_disk_fails_the_stage_naming_the_folder_and_a_rerun_completes(tmp_path,
                                                                              ray_cluster):
    from palign.config.paths import absolute_paths
    from palign.pipeline import run_pipeline
    from palign.runtime.runner import ingest

    # CoTs of ~48 kB: a truncated row (its CoT, and half of it as its prefix) takes ~72 kB.
    cot = " ".join(f"Step {i}: we add {i} and {i + 1} to get {2 * i + 1}." for i in range(1200))
    rows = [{"id": f"long-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1),
             "cot": cot} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with small_disk(tmp_path / "disk") as disk:
        cfg = parse_config(truncate_config(str(disk / "out"), str(data)))
        filler = disk / "filler"
        # Ingest first, on a disk with room for less than its ~200 kB: it fails the same way
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 100_000))
        with pytest.raises(StageFailed, match="no space left on the disk that holds") as failed:
            ingest(absolute_paths(cfg))
        assert str(disk / "out" / "ingest") in str(failed.value)
        filler.unlink()
        ingest(absolute_paths(cfg))  # the stage's input fits; then the disk fills up
        # Room left for two truncated rows, not three (a tmpfs counts 4 kB pages).
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 200_000))
        with pytest.raises(StageFailed) as failed:
            run_pipeline(cfg)
        message = str(failed.value)
        assert "no space left on the disk that holds" in message
        assert str(disk / "out" / "truncate") in message
        assert "Free space on that disk" in message
        stage = disk / "out" / "truncate"
        # Nothing partial: no temporary file stayed; every committed index has its data,
        # which holds the index's rows whole.
        assert not [p for p in stage.rglob(".tmp-*")]
        committed = read_index(stage)["id"].to_pylist()
        assert sorted(r["id"] for r in read_rows(stage)) == sorted(committed)
        assert 0 < len(committed) < len(rows)
        filler.unlink()  # space freed: the same command again
        summary = run_pipeline(cfg)[-1]
        assert summary.skipped == len(committed)
        assert ids(stage) == Counter({r["id"]: 1 for r in rows})
        assert all(r["cot"] == cot for r in read_rows(stage))
