"""The run report at scale: a run folder of 200,000 indexed rows (100 shards of 2,000, with
digests) gives a page of a bounded size, built in a bounded time, from the indexes and at most
32 shards; headless Chromium opens it and runs its script.

Measured on this machine (2 CPU cores shared with other tests): the folder takes 4-9 s to
write, the page 0.9-2.4 s to build (172 KB, 28 shards read), Chromium 1.4-1.9 s to open it.
The bounds below (20 s, 3 MB, 15 s) leave room for a slower CI machine."""

from __future__ import annotations

import time

import pytest
from chromium import dump_dom
from report_runs import big_run

from palign.report.run_report import build_run_report, write_run_report

pytestmark = pytest.mark.slow

ROWS = 200_000
SHARDS = 100


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    counts = big_run(root, shards=SHARDS, per_shard=ROWS // SHARDS)
    return root, counts


@pytest.mark.timeout(120)
def test_a_200k_row_run_builds_fast_into_a_small_page(big):
    root, counts = big
    start = time.perf_counter()
    report = build_run_report(root)
    seconds = time.perf_counter() - start
    assert seconds < 20, f"built in {seconds:.1f} s"
    assert len(report.html.encode()) < 3_000_000 and report.halved == 0
    assert report.rows_shown == 200
    assert report.histograms == {"prefix_ratio": ROWS, "sentence_ratio": ROWS, "probes": ROWS,
                                 "continuation_tokens": ROWS}
    # The thin kinds are shown: both shards holding wrong answers were read, and the
    # one-per-shard unchecked rows took the rest of the 28 shards (32, less 4 kept for
    # rejects); never more.
    assert len(report.shards_read) == 28 <= 32
    assert {"align/part-0017.jsonl", "align/part-0061.jsonl"} <= set(report.shards_read)
    shown = {k: report.html.count(f'data-kind="{k}"') for k in counts}
    assert shown == {"right": 86, "wrong": 86, "unchecked": 28}
    assert "200,000 rows of <code>align</code>" in report.html


@pytest.mark.timeout(120)
def test_chromium_opens_the_200k_page(big, tmp_path):
    root, _ = big
    path = write_run_report(root)
    start = time.perf_counter()
    dom = dump_dom(path, tmp_path / "profile")
    seconds = time.perf_counter() - start
    assert 'data-ready="1"' in dom and seconds < 15, f"opened in {seconds:.1f} s"
