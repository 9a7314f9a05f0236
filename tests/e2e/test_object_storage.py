"""The pipeline on object storage: data, output, train checkpoints, the exported model and the
benchmark on ``s3://``, served by a real S3-compatible server (moto's) on 127.0.0.1, reached
through pyarrow's S3 file system and the standard ``AWS_*`` environment. A run killed midway
and rerun leaves every id exactly once and an export that loads; a model folder on the bucket
is staged once per machine; unknown schemes and buckets that are missing or unreachable fail
before any work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from s3_server import BUCKET

from palign.cli import main as palign_main
from palign.data import lines, storage
from palign.data.shards import read_index, read_rows, write_digest

ROOT = Path(__file__).resolve().parents[2]
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]


def upload(uri: str, rows: list[dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in rows))


def test_storage_round_trip_and_listing(s3):
    base = f"s3://{BUCKET}/unit"
    storage.write_text(f"{base}/a/x.txt", "one\ntwo\n")
    assert storage.read_text(f"{base}/a/x.txt") == "one\ntwo\n"
    assert list(lines.iter_lines(f"{base}/a/x.txt", chunk=3)) == [b"one", b"two"]
    # a piece of a large file: ranged reads, the lines that start in the range
    assert storage.file_size(f"{base}/a/x.txt") == 8
    assert [list(lines.iter_line_range(f"{base}/a/x.txt", a, b, chunk=3))
            for a, b in ((0, 2), (2, 5), (5, None))] == [[(0, b"one")], [(4, b"two")], []]
    assert storage.list_files(f"{base}/a") == ["x.txt"] and storage.list_dirs(base) == ["a"]
    assert storage.is_dir(f"{base}/a") and not storage.exists(f"{base}/none")
    storage.delete_dir(f"{base}/a")
    assert not storage.exists(f"{base}/a/x.txt")


def test_shards_on_the_bucket_commit_by_index_and_release_rejects(s3):
    """No rename on object storage: a data object without its index (a killed write) is never
    read and is cleaned; rejects released for a rerun leave the index first."""
    from palign.data.shards import (
        ShardWriter,
        clean_uncommitted,
        done_index,
        reject_row,
        release_rejects,
        write_shard,
    )

    out = f"s3://{BUCKET}/shards-{time.time_ns()}"
    ShardWriter(out, "jsonl", shard_rows=2).write([{"id": str(i)} for i in range(3)])
    storage.write_text(f"{out}/part-killed.jsonl", '{"id": "ghost"}\n')  # no index: not there
    ShardWriter(f"{out}/rejects").write([reject_row("s1", "truncate", "crash", kind="system"),
                                         reject_row("r1", "truncate", "too long")])
    assert sorted(r["id"] for r in read_rows(out)) == ["0", "1", "2"]
    assert set(done_index(out).to_pylist()) == {"0", "1", "2", "s1", "r1"}
    assert clean_uncommitted(out) == 1 and not storage.exists(f"{out}/part-killed.jsonl")
    assert release_rejects(out, "system") == 1
    assert set(done_index(out).to_pylist()) == {"0", "1", "2", "r1"}
    assert [r["id"] for r in read_rows(f"{out}/rejects_retried")] == ["s1"]
    write_shard(out, "part-empty", [], "jsonl")  # a batch whose rows all went to rejects
    assert sorted(r["id"] for r in read_rows(out)) == ["0", "1", "2"]


def test_unknown_schemes_and_missing_or_unreachable_buckets_fail_before_any_work(
        s3, tmp_path, capsys, monkeypatch):
    def validate(output_dir: str) -> str:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({
            "run": {"output_dir": output_dir, "stages": ["truncate"]},
            "data": {"path": f"s3://{BUCKET}/none.jsonl"},
            "models": {"student": "smollm2-135m"}}))
        assert palign_main(["validate", str(cfg)]) == 2
        return capsys.readouterr().err

    assert "run.output_dir: hdfs://nn/run: hdfs:// is not a supported" in validate("hdfs://nn/run")
    err = validate("s3://no-such-bucket/run")
    assert "run.output_dir: s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist" in err
    assert f"data.path: s3://{BUCKET}/none.jsonl does not exist" in validate(f"s3://{BUCKET}/r")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    storage._filesystem.cache_clear()
    try:
        assert "cannot reach it" in validate(f"s3://{BUCKET}/run")
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["AWS_ENDPOINT_URL_S3"])
        storage._filesystem.cache_clear()
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # never a local folder


def test_a_rank_restoring_from_the_bucket_fetches_only_its_own_shards(s3, tmp_path):
    from palign.train.checkpoints import RemoteResume, rank_files

    uri = f"s3://{BUCKET}/ckpt-{time.time_ns()}/checkpoint_00000010"
    shared = ["train_state.json", "ds/mp_rank_00_model_states.pt"]
    per_rank = {r: [f"rng/rank_{r}.pt", f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"]
                for r in range(12)}  # rank 1 must not take rank 10's or 11's
    for rel in shared + [f for files in per_rank.values() for f in files]:
        storage.write_text(f"{uri}/{rel}", '{"world_size": 12, "step": 10}')
    fs, path = storage.resolve(uri)
    resume = RemoteResume(fs, path, tmp_path / "rank1")
    assert resume.state == {"world_size": 12, "step": 10}  # read before any fetch
    folder = resume.fetch(rank_files(1))
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == sorted(shared + per_rank[1])
    everything = RemoteResume(fs, path, tmp_path / "all").fetch(None)  # elastic: the whole
    assert len([p for p in everything.rglob("*") if p.is_file()]) == 2 + 2 * 12


def test_a_model_folder_on_the_bucket_is_staged_once_per_machine(s3, tmp_path):
    from palign.engines.models import resolve_model

    uri = f"s3://{BUCKET}/models/tiny-{time.time_ns()}"
    storage.write_text(f"{uri}/config.json", "{}")
    storage.write_text(f"{uri}/tokenizer/vocab.txt", "a\nb\n")
    first = resolve_model(uri, str(tmp_path / "cache"))
    assert Path(first, "tokenizer", "vocab.txt").read_text() == "a\nb\n"
    storage.delete(f"{uri}/tokenizer/vocab.txt")  # a second call must not fetch again
    assert resolve_model(uri, str(tmp_path / "cache")) == first
    assert Path(first, "tokenizer", "vocab.txt").read_text() == "a\nb\n"
    assert list((tmp_path / "cache" / "staged").glob(".*tmp-*")) == []
    # Exported again to the same URI (config.json is written last): staged again, not stale.
    storage.write_text(f"{uri}/tokenizer/vocab.txt", "c\n")
    storage.write_text(f"{uri}/config.json", '{"v": 2}')
    second = resolve_model(uri, str(tmp_path / "cache"))
    assert second != first and Path(second, "tokenizer", "vocab.txt").read_text() == "c\n"
    storage.delete(f"{uri}/config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(uri, str(tmp_path / "cache"))


def ids(uri: str) -> Counter:
    return Counter(r["id"] for r in [*read_rows(uri), *read_rows(f"{uri}/rejects")])


@pytest.mark.ray
@pytest.mark.model
@pytest.mark.timeout(900)
def test_pipeline_on_s3_killed_midway_resumes_every_id_exactly_once(s3, tmp_path):
    """generate, truncate, align, train and evaluate (the trained model, staged from the
    bucket) with data, output, train data, checkpoints and benchmark on s3://: `palign run` is
    killed after the first truncate batch is committed (a second run meanwhile refuses the
    busy output), then run again."""
    good = [r for r in DEMO if r.get("cot")][:5]
    no_cot = [r for r in DEMO if not r.get("cot")][:1]  # the teacher writes its CoT
    base = f"s3://{BUCKET}/run-{time.time_ns()}"
    long_cot = " ".join(f"Step {i}: we add {i} and {i + 1} to get {2 * i + 1}." for i in range(700))
    too_long = {"id": "bad-too-long-for-engine", "question": "Add them up.", "answer": "7",
                "cot": long_cot}  # fits data.max_cot_chars, not the engine's context
    upload(f"{base}/data/problems.jsonl",
           [*good, *no_cot, {"id": "bad-no-question", "answer": "1"}, too_long])
    upload(f"{base}/data/bench.jsonl",
           [{"id": f"b{i}", "question": r["question"], "answer": r["answer"]}
            for i, r in enumerate(DEMO[10:12])])
    raw = {
        "run": {"output_dir": f"{base}/out",
                "stages": ["generate", "truncate", "align", "train", "evaluate"]},
        "ray": {"progress_bars": False},
        "data": {"path": f"{base}/data/problems.jsonl"},
        "models": {"student": "smollm2-135m", "teacher": "smollm2-135m"},
        "generate": {"sampling": {"max_tokens": 24}},
        # the transformers engine: it starts in a third of vLLM's time, and this test is about
        # the store (vLLM on a store is test_storage_faults')
        "engine": {"backend": "transformers", "dtype": "float32", "max_model_len": 2048,
                   "batch_size": 2, "cpus_per_replica": 2,
                   # one batch at a time per actor: a kill after the first commit lands midway
                   "max_in_flight": 2},
        "truncate": {"verdict": "score"},
        "align": {"sampling": {"max_tokens": 16}},
        # LoRA, as the paper trains: its checkpoints hold the adapters, not 1.6 GB of weights
        # and Adam states for the in-process S3 server to take in
        "train": {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 1024, "max_steps": 1,
                  "checkpoint_every": 1, "micro_batch_size": 1, "grad_accum": 1,
                  "lora": {"r": 4, "alpha": 8}},
        "evaluate": {"n": 1, "sampling": {"max_tokens": 16},
                     "benchmarks": [{"name": "mini", "path": f"{base}/data/bench.jsonl"}],
                     "models": [{"label": "trained", "model": "trained"}]},
        "output": {"shard_rows": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = f"{base}/out"
    cmd = [sys.executable, "-m", "palign.cli", "run", str(path)]
    env = {**os.environ, **s3, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 420  # the suite's first vLLM start on a fresh machine is slow
    while not storage.exists(f"{out}/_LOCK"):
        assert proc.poll() is None, "the run ended before it took its lock"
        assert time.time() < deadline, "no lock taken in 420 s"
        time.sleep(0.5)
    # A second run on the busy output refuses before any work, naming the holder (checked
    # while the first is still early on: its truncate may finish during the seconds this takes)
    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another palign run: pid {proc.pid} on host" in second.stderr
    while not storage.list_files(f"{out}/truncate/_index", prefix="part-"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no truncate batch committed in 420 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The dead driver's Ray workers go down with its raylet, a moment later (seconds on a busy
    # machine): a write already under way may still commit. Count once the output has stayed
    # the same for 12 s.
    first, still, deadline = ids(f"{out}/truncate"), 0, time.time() + 120
    while still < 8 and time.time() < deadline:
        time.sleep(1.5)
        settled, first = first, ids(f"{out}/truncate")
        still = still + 1 if settled == first else 0
    assert still == 8, "the killed run's writers did not settle in 120 s"
    assert 0 < sum(first.values()) < len(good) + 2  # killed midway

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over" in done.stderr  # the dead run's lock object
    row = re.search(r"^truncate\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", done.stdout, re.M)
    assert row and int(row.group(4)) == sum(first.values())  # "resumed": not redone
    for stage in ("ingest", "generate", "truncate", "align", "evaluate/trained/mini"):
        counts = ids(f"{out}/{stage}")
        assert counts and all(n == 1 for n in counts.values()), (stage, counts)
    # Each engine stage and the ingest left a digest of its indexes, up to date: its parts
    # (truncate's: one from the resumed start, one for what the rerun wrote) hold every index
    # file, and the readers' ids (from it) are those of the indexes one by one.
    for stage in ("ingest", "generate", "truncate", "align"):
        digest = storage.stat_files(f"{out}/{stage}/_index", prefix="_digest")
        assert len(digest) == (2 if stage == "truncate" else 1), (stage, digest)
        n_index = len(storage.list_files(f"{out}/{stage}/_index", prefix="part-"))
        assert write_digest(f"{out}/{stage}") == n_index
        assert storage.stat_files(f"{out}/{stage}/_index", prefix="_digest") == digest
        assert sorted(read_index(f"{out}/{stage}")["id"].to_pylist()) == sorted(
            r["id"] for r in read_rows(f"{out}/{stage}"))
    trained_on = {r["id"] for r in [*good, *no_cot]}
    assert set(ids(f"{out}/generate")) == trained_on | {too_long["id"]}  # CoTs pass through
    sources = {r["id"]: r["cot_source"] for r in read_rows(f"{out}/generate")}
    assert sources[no_cot[0]["id"]] == "teacher" and sources[good[0]["id"]] == "data"
    assert set(ids(f"{out}/truncate")) == trained_on | {too_long["id"]}
    assert set(ids(f"{out}/align")) == trained_on
    reasons = {r["id"]: r["reason"] for r in read_rows(f"{out}/truncate/rejects")}
    assert "prompt too long" in reasons[too_long["id"]]
    assert Counter(r["id"] for r in read_rows(f"{out}/ingest/rejects"))["bad-no-question"] == 1
    assert set(ids(f"{out}/evaluate/trained/mini")) == {"b0", "b1"}
    results = json.loads(storage.read_text(f"{out}/evaluate/results.json"))
    assert results["models"]["trained"]["mini"]["n"] == 1
    # Ray Train kept its checkpoints on the bucket; the export is there and loads.
    ckpts = storage.list_dirs(f"{out}/train/ray/palign-train")
    assert any(c.startswith("checkpoint_") for c in ckpts), ckpts
    summary = json.loads(storage.read_text(f"{out}/train/summary.json"))
    assert summary["done"] and summary["model_dir"] == f"{out}/train/model"
    from transformers import AutoModelForCausalLM

    from palign.engines.models import resolve_model

    local = resolve_model(f"{out}/train/model", str(tmp_path / "cache"))
    assert AutoModelForCausalLM.from_pretrained(local).config.model_type == "llama"
    assert not (tmp_path / "s3:").exists()  # nothing went to a local folder named after it
