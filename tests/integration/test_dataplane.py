"""The driver plans from indexes and never holds rows: its Python memory while a stage runs
does not grow with the data (20 KB CoTs through ingest and truncate `full`, no model, on the
session's local Ray); a rerun with everything done reads no shard."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from palign.config import parse_config
from palign.data.digest import read_index
from palign.runtime.runner import run_stage

pytestmark = pytest.mark.ray
COT = " ".join(f"Step {i}: {i} plus {i} is {2 * i}." for i in range(800))  # about 20 KB


def config(tmp_path, rows: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"data-{rows}.jsonl"
    with data.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "question": f"What is {i} + {i}?",
                                "answer": str(2 * i), "cot": COT}) + "\n")
    return parse_config({
        "run": {"output_dir": str(tmp_path / f"out-{rows}"), "stages": ["truncate"]},
        "ray": {"progress_bars": False}, "data": {"path": str(data)},
        "models": {"student": "smollm2-135m"}, "truncate": {"strategy": "full"},
        "engine": {"batch_size": 32, "cpus_per_replica": 1},
        "output": {"shard_rows": 64}}), data.stat().st_size


def driver_peak(cfg) -> tuple[int, object]:
    tracemalloc.start()
    try:
        summary = run_stage(cfg, "truncate")
        return tracemalloc.get_traced_memory()[1], summary
    finally:
        tracemalloc.stop()


def test_the_driver_never_materialises_the_rows(tmp_path, ray_cluster):
    run_stage(config(tmp_path / "warm", 8)[0], "truncate")  # Ray Data's own first-use costs
    small_cfg, small_bytes = config(tmp_path, 40)
    big_cfg, big_bytes = config(tmp_path, 640)
    small_peak, small = driver_peak(small_cfg)
    big_peak, big = driver_peak(big_cfg)
    assert (small.rows_out, big.rows_out) == (40, 640)
    assert big_bytes - small_bytes > 12_000_000
    # Holding the rows once would add 12 MB; the plan of 600 more ids adds a few hundred KB.
    assert big_peak - small_peak < 0.1 * (big_bytes - small_bytes), (small_peak, big_peak)
    assert read_index(big.output_dir, ("prefix_ratio",))["prefix_ratio"].to_pylist() == [1.0] * 640

    again_peak, again = driver_peak(big_cfg)  # all done: planned from the indexes, no read
    assert (again.skipped, again.processed, again.rows_out) == (640, 0, 640)
    assert again_peak < 0.1 * big_bytes
