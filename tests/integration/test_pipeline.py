"""truncate + align end to end on a real local Ray cluster, with SmolLM2 through both engines,
and their rejects. (A run killed midway and resumed is tests/e2e/test_object_storage.py's pipeline
test, on s3://.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palign.config import parse_config
from palign.data.shards import read_rows
from palign.engines import available_backends
from palign.pipeline import run_pipeline
from palign.report.summary_file import read_summary

pytestmark = [pytest.mark.ray, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[2]
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]

TRUNCATE_FIELDS = {"id", "question", "answer", "cot", "prefix", "prefix_offset",
                   "sentences_kept", "sentences_total", "prefix_ratio", "sufficient", "probes"}
ALIGN_FIELDS = TRUNCATE_FIELDS | {"continuation", "target", "predicted_answer", "answer_correct"}


def write_data(path: Path, good: int) -> list[str]:
    """``good`` demo rows with CoTs, then rows that must be rejected; returns the good ids."""
    rows = [dict(r) for r in DEMO[:good]]
    long_cot = " ".join(f"Step {i}: we add {i} and {i + 1} to get {2 * i + 1}." for i in range(700))
    rows += [
        {"id": "bad-no-question", "answer": "1", "cot": "A. B."},
        {"id": "bad-cot-type", "question": "Q?", "answer": "1", "cot": ["not", "text"]},
        {"id": "bad-too-long-for-engine", "question": "Add them up.", "answer": "7",
         "cot": long_cot},  # fits data.max_cot_chars, not the engine's context
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return [r["id"] for r in rows[:good]]


def make_config(tmp: Path, backend: str, good: int = 3, **over) -> dict:
    good_ids = write_data(tmp / "data.jsonl", good)
    cfg = {
        "run": {"output_dir": str(tmp / "out"), "stages": ["truncate", "align"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(tmp / "data.jsonl")},
        "models": {"student": "smollm2-135m"},
        "engine": {"backend": backend, "dtype": "float32", "max_model_len": 2048,
                   "batch_size": 8, "cpus_per_replica": 2, "cpu_kv_cache_gib": 1},
        "truncate": {"verdict": "score"},
        "align": {"sampling": {"max_tokens": 24}},
        "output": {"shard_rows": 64},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    cfg["_good_ids"] = good_ids
    return cfg



@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_truncate_and_align_write_all_fields(tmp_path, ray_cluster, backend):
    # Both are hard dependencies of the suite: a missing one fails here, never skips.
    assert backend in available_backends(), f"{backend} is not installed (make setup)"
    raw = make_config(tmp_path, backend)
    good_ids = raw.pop("_good_ids")
    cfg = parse_config(raw)
    summaries = {s.stage: s for s in run_pipeline(cfg)}

    out = Path(cfg.run.output_dir)
    truncated = list(read_rows(out / "truncate"))
    aligned = list(read_rows(out / "align"))
    assert sorted(r["id"] for r in aligned) == sorted(good_ids)
    for rec in truncated:
        assert TRUNCATE_FIELDS <= rec.keys()
        assert rec["prefix"] == rec["cot"][:rec["prefix_offset"]]
        assert 1 <= rec["sentences_kept"] <= rec["sentences_total"]
        assert 0 < rec["prefix_ratio"] <= 1
        assert 1 <= len(rec["probes"]) <= (rec["sentences_total"] + 1).bit_length()
        assert all(p["verdict"] in ("ENOUGH", "NOT_ENOUGH") and 0 <= p["score"] <= 1
                   for p in rec["probes"])
    for rec in aligned:
        assert ALIGN_FIELDS <= rec.keys()
        assert rec["target"] == (f"<Begin_of_Draft>{rec['prefix']}<End_of_Draft>\n"
                                 f"{rec['continuation']}")
        assert isinstance(rec["answer_correct"], bool)

    ingest_rejects = {r["id"]: r["reason"] for r in read_rows(out / "ingest/rejects")}
    assert "missing question" in ingest_rejects["bad-no-question"]
    assert "not a string" in ingest_rejects["bad-cot-type"]
    assert any("invalid JSON" in reason for reason in ingest_rejects.values())
    truncate_rejects = {r["id"]: r["reason"] for r in read_rows(out / "truncate/rejects")}
    assert "prompt too long" in truncate_rejects["bad-too-long-for-engine"]
    assert summaries["truncate"].rows_out == len(good_ids)
    assert summaries["align"].rows_out == len(good_ids)
    # The rows' searches ran side by side in the engine (one batch of 4 rows here).
    assert summaries["truncate"].stats["engine_peak_in_flight"] > 1
    assert summaries["truncate"].engine["prompt_tokens"] > 0
    for stage in ("truncate", "align"):  # kept for the report and `palign plan`
        kept = read_summary(out / stage)
        assert kept["rows_out"] == len(good_ids) and kept["processed"] == summaries[stage].processed
        assert kept["engine"]["prompt_tokens"] == summaries[stage].engine["prompt_tokens"] > 0
        # the judge's prompts, the continuations: what the records account for
        assert kept["engine"]["work_tokens"] > 0
        assert 0 < kept["engine"]["init_s"] < kept["wall_s"]  # the engine's load, timed apart
    if backend == "vllm":  # probes of one example share their opening: the cache serves it
        stats = summaries["truncate"].stats
        assert stats["prompt_cache_share"] > 0.2
        assert stats["engine_prefix_cache_share"] > 0.2
        # Each row's probes followed each other: its question and CoT opening stayed cached,
        # so the judge computed about one longest prompt per row (plus the first probe's).
        assert 1.0 <= stats["prefill_per_row"] < 2.0
