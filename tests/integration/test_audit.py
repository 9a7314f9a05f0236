"""``palign audit`` through the real runner on a local Ray cluster.

With the scripted judge and student (tests/support/scripted_engines.py), whose CoT markers fix
P(ENOUGH) per prefix and the pass count of the rollouts, every figure is known in advance:
the curves, the breaks, where binary search and a scan land, the probes on a sparse grid and
the passes at each rollout point, worked out by hand below. Then the demo config with SmolLM2
end to end, small (2 rows, 2 points of 2 rollouts of 32 tokens).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from synthetic_rows import rows_with_curve

from palign.config import parse_config
from palign.data.shards import read_rows
from palign.pipeline import run_pipeline
from palign.report.summary_file import read_summary
from palign.runtime.audit import add_arguments, main

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
SCRIPTED = "scripted_engines:ScriptedJudge"

# P(ENOUGH) per prefix length k (index k-1) and rollout rates (R of every 4 pass) per sentence.
CURVES = [
    [0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9],  # 00 monotone: binary 4 (probes 4, 2, 3), scan 4
    [0.1, 0.9, 0.2, 0.3, 0.6, 0.7, 0.8],  # 01 ENOUGH at 2 then not: binary 5 (4, 6, 5), scan 2
    [0.2, 0.7, 0.6, 0.8, 0.9],            # 02 P drops 0.1 at 2 -> 3, both ENOUGH: binary 2, scan 2
    [0.1, 0.2, 0.3],                      # 03 never enough: both keep all 3
    [k / 20 for k in range(1, 21)],       # 04 20 sentences, sparse grid: binary 10, scan 10
]
RATES = [
    [(0, 4), (0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (4, 4)],
    [(1, 4)] * 7,
    [None] * 5,  # no rate: no rollout passes
    [None] * 3,
    [(3, 4)] * 20,
]
# --max-probes 6: rows of up to 7 sentences get a grid that binary search fills in to every k;
# row 04 gets 1 5 9 12 16 20, plus 10, 7 and 8 that its binary search (10 5 7 8 9) needs.
PROBED = {"curve-00": 7, "curve-01": 7, "curve-02": 5, "curve-03": 3, "curve-04": 9}
BINARY = {"curve-00": (4, [4, 2, 3]), "curve-01": (5, [4, 6, 5]), "curve-02": (2, [3, 1, 2]),
          "curve-03": (3, [2, 3]), "curve-04": (10, [10, 5, 7, 8, 9])}
SCAN = {"curve-00": 4, "curve-01": 2, "curve-02": 2, "curve-03": 3, "curve-04": 10}
BREAKS = {"curve-01": [[2, 3]], "curve-02": [[2, 3]]}
# Rollout points (--points 3): binary's k, the scan's, then 1/4, 1/2, all of the CoT; each
# with its passes out of 4.
PASSES = {"curve-00": {2: 0, 4: 2, 7: 4}, "curve-01": {2: 1, 4: 1, 5: 1},
          "curve-02": {2: 0, 3: 0, 5: 0}, "curve-03": {1: 0, 2: 0, 3: 0},
          "curve-04": {5: 3, 10: 3, 20: 3}}


def scripted_config(tmp: Path, **engine: object) -> Path:
    rows = rows_with_curve(CURVES, RATES)
    rows.append({"id": "no-cot", "question": "Q? (answer 42)", "answer": "42"})
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "run": {"output_dir": str(tmp / "out"), "stages": ["truncate", "align"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(data)},
        "models": {"student": "smollm2-135m"},
        "engine": {"backend": SCRIPTED, "batch_size": 4, "cpus_per_replica": 1,
                   "engine_kwargs": {"log": str(tmp / "requests.jsonl")}},
        "truncate": {"verdict": "score", "threshold": 0.5},
        "align": {"sampling": {"max_tokens": 32}, **engine},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def audit_args(config: Path | str, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(config), *flags])


def audited(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_rows(out / "audit" / "rows")}


def check_scripted_rows(rows: dict[str, dict]) -> None:
    assert set(rows) == set(PROBED)  # the row without a CoT is not sampled
    for rid, row in rows.items():
        assert len(row["curve"]) == PROBED[rid], rid
        assert [p["k"] for p in row["curve"]] == sorted(p["k"] for p in row["curve"])
        assert (row["binary"]["k"], row["binary"]["probes"]) == BINARY[rid], rid
        assert row["scan_k"] == SCAN[rid], rid
        assert row["breaks"] == BREAKS.get(rid, []), rid
        assert {r["k"]: r["passed"] for r in row["rollouts"]} == PASSES[rid], rid
        assert all(r["n"] == 4 and r["from_prefix"] == 0 for r in row["rollouts"])
    grid = [p["k"] for p in rows["curve-04"]["curve"]]
    assert grid == [1, 5, 7, 8, 9, 10, 12, 16, 20]


def test_scripted_audit_counts_breaks_binary_vs_scan_and_passes_exactly(tmp_path, ray_cluster):
    config = scripted_config(tmp_path)
    # truncate first, so that the audit's scores meet the stored probes
    run_pipeline(parse_config(yaml.safe_load(config.read_text())), ["truncate"])
    assert main(audit_args(config, "--sample", "10", "--rollouts", "4", "--points", "3",
                           "--max-probes", "6")) == 0
    out = tmp_path / "out"
    rows = audited(out)
    check_scripted_rows(rows)
    report = json.loads((out / "audit" / "audit.json").read_text())
    assert report["format"] == "palign.audit/1"
    assert report["counts"]["rows"] == 5 and report["counts"]["probes"] == sum(PROBED.values())
    assert report["counts"]["rollout_samples"] == 15 * 4
    mono = report["monotonicity"]
    assert (mono["breaks"], mono["flips"], mono["drops"], mono["rows_with_breaks"]) == (2, 1, 1, 2)
    bvs = report["binary_vs_scan"]
    assert (bvs["differ"], bvs["binary_longer"], bvs["ids"]) == (1, 1, ["curve-01"])
    stored = report["stored"]
    assert stored["rows"] == 5 and stored["max_abs_dp"] == 0.0
    assert stored["verdicts_differ"] == 0
    for name in ("audit.md", "calibration.png", "curves.png"):
        assert (out / "audit" / name).stat().st_size > 0, name
    assert "## Monotonicity" in (out / "audit" / "audit.md").read_text()
    assert read_summary(str(out / "audit" / "rows"))["rows_out"] == 5
    # Every rollout of a row had its own seed: seeds 0..11 (3 points x 4), once per row.
    seeds = [e["seed"] for e in map(json.loads, (tmp_path / "requests.jsonl").open())
             if e["kind"] == "rollout"]
    assert Counter(seeds) == {s: 5 for s in range(12)}


def test_a_judge_on_other_engine_settings_audits_in_two_pools(tmp_path, ray_cluster):
    # align's engine differs from truncate's: curves on one pool, rollouts on another
    config = scripted_config(tmp_path, engine={"max_in_flight": 7})
    assert main(audit_args(config, "--sample", "10", "--max-probes", "6")) == 0
    out = tmp_path / "out"
    check_scripted_rows(audited(out))
    assert len(list(read_rows(out / "audit" / "curves"))) == 5
    assert json.loads((out / "audit" / "audit.json").read_text())["stored"] is None


def test_bad_flags_are_refused_before_any_work(tmp_path, capsys):
    config = scripted_config(tmp_path)
    assert main(audit_args(config, "--sample", "0", "--target-pass", "2")) == 2
    err = capsys.readouterr().err
    assert "--sample" in err and "--target-pass" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_demo_audit_runs_end_to_end(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo's data path is relative to the repository
    args = audit_args("configs/demo.yaml", "--sample", "2", "--rollouts", "2", "--points", "2",
                      "--set", "align.sampling.max_tokens=32",
                      "--set", f"run.output_dir={tmp_path / 'demo'}")
    assert main(args) == 0
    folder = tmp_path / "demo" / "audit"
    report = json.loads((folder / "audit.json").read_text())
    rows = audited(tmp_path / "demo")
    assert report["counts"]["rows"] == len(rows) == 2
    for row in rows.values():
        assert len(row["curve"]) == row["sentences_total"]  # demo CoTs are under 64 sentences
        assert all(0 <= p["score"] <= 1 for p in row["curve"])
        assert len(row["rollouts"]) == 2 and all(r["n"] == 2 for r in row["rollouts"])
    for name in ("audit.md", "calibration.png", "curves.png"):
        assert (folder / name).stat().st_size > 0, name
