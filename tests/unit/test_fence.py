"""Fenced writers: a run that takes a folder over never sees a late commit of the run it
superseded. The old run's worker is slowed just before its commit (its index write is held
back by a proxy in front of the S3-compatible server, as a slow network would) while a new run
takes the folder over, cleans it and plans; then the late index lands. No id is written twice
and no index is left without its data."""

from __future__ import annotations

import json
import threading
import time

from s3_proxy import HoldingProxy
from s3_server import BUCKET

from palign.config import parse_config
from palign.data import storage
from palign.data.digest import write_digests
from palign.data.shards import ShardWriter, done_index, read_ids
from palign.runtime.accounting import account
from palign.runtime.dataplane import plan
from palign.runtime.runner import prepare_output
from palign.runtime.spec import WorkerSpec
from palign.runtime.worker import StageWorker

ROWS = [{"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
         "cot": f"We add {i} and {i}. That makes {2 * i}."} for i in range(4)]


def batch(rows: list[dict]) -> dict:
    return {"record": [json.dumps(r) for r in rows]}


OLD, NEW = "00000000000000000001aaaaaa", "00000000000000000002bbbbbb"  # two runs' tokens


def _old_commit(request: bytes) -> bool:
    """The superseded run's index write (its commit)."""
    line = request.split(b"\r\n", 1)[0]
    return line.startswith(b"PUT ") and f"/_index/part-{OLD}-".encode() in line


def test_a_superseded_writer_slowed_before_its_commit_is_never_seen(s3, monkeypatch):
    base = f"s3://{BUCKET}/fence-{time.time_ns()}"
    source = f"{base}/ingest"
    ShardWriter(source, shard_rows=2).write(ROWS)
    cfg = parse_config({"run": {"output_dir": base, "stages": ["truncate"]},
                        "data": {"path": "unused.jsonl"}, "models": {"student": "unused"},
                        "truncate": {"strategy": "full"}})
    out = cfg.stage_dir("truncate")
    prepare_output(out, "system", OLD)

    def takeover() -> int:
        """The next run takes the folder over (cleans it, plans) while the commit is held."""
        prepare_output(out, "system", NEW)
        return plan(source, done_index(out)).pending

    proxy = HoldingProxy(s3["AWS_ENDPOINT_URL_S3"], _old_commit, takeover)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    storage._filesystem.cache_clear()
    try:
        slow = StageWorker(WorkerSpec.of(cfg, "truncate", token=OLD))
        writer = threading.Thread(target=lambda: _quietly(slow, batch(ROWS[:2])))
        writer.start()
        writer.join(120)  # its data written, its commit held until the takeover is done
        assert proxy.done.is_set() and proxy.outcome == 4, proxy.outcome
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["AWS_ENDPOINT_URL_S3"])
        storage._filesystem.cache_clear()
    assert storage.list_files(f"{out}/_index", prefix=f"part-{OLD}-")  # it did land, late

    fresh = StageWorker(WorkerSpec.of(cfg, "truncate", token=NEW))
    fresh(batch(ROWS[:2]))
    fresh(batch(ROWS[2:]))
    write_digests(out)
    account("truncate", source, out)  # each id once; every visible index has its data
    assert read_ids(out) == {r["id"] for r in ROWS}
    prepare_output(out, "system", "00000000000000000003cccccc")  # the next run tidies it
    assert not storage.list_files(f"{out}/_index", prefix=f"part-{OLD}-")
    assert read_ids(out) == {r["id"] for r in ROWS}


def _quietly(worker: StageWorker, rows: dict) -> None:
    try:
        worker(rows)
    except Exception:  # noqa: BLE001 - a superseded writer may fail; only its commit matters
        pass
