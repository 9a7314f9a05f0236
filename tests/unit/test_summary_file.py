"""``<stage_dir>/_SUMMARY.json``: written and read back whole, on disk and on s3://; the data
plane's cleaning and digests leave it alone; and the worker's side of it (its start time and
the tokens its records account for, counted with each batch), for a stage a tool names by
import path, outside any stage list. No Ray: the worker runs in this process."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from s3_server import BUCKET
from toy_stage import Shout, ShoutSection

from palign.config import parse_config, stage_names
from palign.data import storage
from palign.data.digest import count_rows, read_index
from palign.data.shards import ShardWriter
from palign.report.summary_file import (
    ENGINE_KEYS,
    SUMMARY_FILE,
    SUMMARY_FORMAT,
    read_summary,
    summary_record,
    write_summary,
)
from palign.runtime.runner import prepare_output
from palign.runtime.spec import WorkerSpec
from palign.runtime.summary import StageSummary, save_summary
from palign.runtime.worker import StageWorker
from palign.stages.base import BatchMetrics, Row

ROWS = [{"id": f"q{i}", "question": f"Is {i} even?", "answer": "yes"} for i in range(3)]


class CountingShout(Shout):
    """The toy stage, with the tokens its records account for (a shout's length), and a grader
    it would need by ``grades`` but does not by its section."""

    grades = True

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return BatchMetrics(tokens=sum(r["length"] for r in records))

    def needs_grader(self, section: Any) -> bool:
        return section.suffix == "?"  # never here: no grading worker starts


def location(kind: str, tmp_path, request) -> str:
    if kind == "s3":
        request.getfixturevalue("s3")
        return f"s3://{BUCKET}/summary-{time.time_ns()}/align"
    return str(tmp_path / "align")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_summary_is_read_back_as_written(kind, tmp_path, request):
    folder = location(kind, tmp_path, request)
    assert read_summary(folder) is None  # the stage never finished there
    record = summary_record(
        "align", rows_in=10, rows_out=np.int64(7), rejected=2, skipped=1, processed=9,
        wall_s=12.5, engine={"prompt_tokens": np.int64(900), "cached_tokens": 300,
                             "peak_in_flight": 4, "init_s": 3.25},
        stats={"right": np.float64(0.5), "empty": float("nan"), "steps": [1, 2]})
    write_summary(folder, record)
    got = read_summary(folder)
    assert got == json.loads(json.dumps(record)) == record
    assert got["format"] == SUMMARY_FORMAT and got["rows_out"] == 7
    assert got["engine"] == {"prompt_tokens": 900, "cached_tokens": 300, "peak_in_flight": 4,
                             "init_s": 3.25, "work_tokens": 0, "completion_tokens": 0,
                             "requests": 0, "retries": 0}  # every key, zero when unsaid
    assert got["stats"] == {"right": 0.5, "empty": None, "steps": [1, 2]}  # NaN is no JSON
    assert got["finished_at"].startswith(str(time.gmtime().tm_year))


def test_a_summary_of_another_format_or_broken_is_not_read(tmp_path):
    folder = tmp_path / "truncate"
    folder.mkdir()
    (folder / SUMMARY_FILE).write_text(json.dumps({"format": "palign.summary/9"}))
    assert read_summary(folder) is None
    (folder / SUMMARY_FILE).write_text('{"format": "palign.summ')
    assert read_summary(folder) is None


def test_save_summary_keeps_counts_engine_and_stats_never_the_reasons(tmp_path):
    reasons = [f"r{i}: prompt too long" for i in range(5)]
    summary = StageSummary("truncate", rows_in=8, rows_out=3, rejected=5, processed=8,
                           engine={"prompt_tokens": 50, "init_s": 1.5, "work_tokens": 40},
                           wall_s=2.0, stats={"prefix_ratio_mean": 0.4},
                           output_dir=str(tmp_path / "truncate"), reasons=reasons)
    path = save_summary(summary)
    assert path == storage.join(tmp_path / "truncate", SUMMARY_FILE)
    got = read_summary(tmp_path / "truncate")
    assert (got["stage"], got["rows_in"], got["rows_out"], got["rejected"]) == ("truncate", 8, 3, 5)
    assert got["engine"]["init_s"] == 1.5 and got["engine"]["work_tokens"] == 40
    assert set(got["engine"]) == set(ENGINE_KEYS) and got["stats"] == {"prefix_ratio_mean": 0.4}
    assert "prompt too long" not in (tmp_path / "truncate" / SUMMARY_FILE).read_text()


def test_cleaning_and_digests_leave_the_summary_alone(tmp_path):
    folder = str(tmp_path / "truncate")
    ShardWriter(folder, shard_rows=2).write([{**r, "cot": "x"} for r in ROWS])
    write_summary(folder, summary_record("truncate", rows_in=3, rows_out=3, rejected=0,
                                         skipped=0, processed=3, wall_s=1.0, engine={},
                                         stats={}))
    prepare_output(folder, "system", "00000000000000000009cccccc")  # seal, fence, clean, digest
    assert read_summary(folder)["rows_out"] == 3
    assert count_rows(folder) == 3 and sorted(read_index(folder)["id"].to_pylist()) == [
        "q0", "q1", "q2"]


def test_a_tool_runs_a_stage_outside_the_list_and_the_worker_reports_its_costs(tmp_path):
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "run"), "stages": ["truncate"]},
                        "data": {"path": "unused.jsonl"}, "models": {"student": "unused"},
                        "truncate": {"strategy": "full"}})
    assert "shout" not in stage_names()
    out = tmp_path / "tool" / "sample"
    spec = WorkerSpec.for_tool(cfg, "shout", f"{__name__}:CountingShout",
                               {"suffix": "!?", "engine": {"batch_size": 2}}, None, str(out))
    assert spec.section["suffix"] == "!?" and spec.out_dir == str(out) and spec.model is None
    assert ShoutSection.model_validate(spec.section).engine.batch_size == 2
    worker = StageWorker(spec)
    assert worker.grader is None  # grades, but its section needs no grader
    got = worker({"record": [json.dumps(r) for r in ROWS[:2]]})
    shouts = ["IS 0 EVEN?!?", "IS 1 EVEN?!?"]
    assert got["rows"] == [2] and got["ok"] == [2]
    assert got["work_tokens"] == [sum(len(s) for s in shouts)]
    [init_s] = got["init_s"]
    assert 0 < init_s < 60 and not math.isnan(init_s)
    assert count_rows(str(out)) == 2  # written where the tool said
    again = worker({"record": [json.dumps(r) for r in ROWS[:2]]})  # committed: nothing new
    assert again["work_tokens"] == [0] and again["init_s"] == [init_s]
