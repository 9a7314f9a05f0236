"""The judge audit's files (palign.report.audit) from hand-made audit rows: every figure in
audit.json worked out below, the Markdown's sections, and the two PNGs written."""

import json

import pytest

from palign.method.audit import AuditRow, Rollout, audit_row, with_rollouts
from palign.method.search import Probe
from palign.method.verdict import verdict_from_score
from palign.report.audit import (
    AUDIT_FORMAT,
    AUDIT_JSON,
    AUDIT_MD,
    CALIBRATION_PNG,
    CURVES_PNG,
    AuditSettings,
    write_audit,
)

PNG = b"\x89PNG\r\n\x1a\n"


def scored(row_id, scores, rollouts, t=0.5):
    probes = [Probe(k, verdict_from_score(s, t), s) for k, s in enumerate(scores, start=1)]
    return with_rollouts(audit_row(row_id, len(scores), t, "score", probes), rollouts)


def rows():
    # a: N E N N N N E: binary keeps 7, the scan 2; breaks 2->3 (a flip) and 4->5 (a drop).
    a = scored("a", [0.1, 0.7, 0.2, 0.3, 0.2, 0.4, 0.9],
               [Rollout(2, 4, 1, 0, 40), Rollout(4, 4, 2, 0, 40), Rollout(7, 4, 4, 2, 20)])
    b = scored("b", [0.2, 0.4, 0.6, 0.8],  # monotone: both keep 3
               [Rollout(1, 4, 0, 0, 50), Rollout(3, 4, 3, 0, 30), Rollout(4, 4, 4, 0, 10)])
    c = scored("c", [0.9, 0.95, 1.0], [Rollout(1, 4, 1, 0, 60)])  # both keep 1
    return [c.to_record(), a, b]  # records and rows alike, in any order


def test_audit_json_figures_exact(tmp_path):
    stored = {"a": [{"k": 4, "verdict": "NOT_ENOUGH", "score": 0.31},
                    {"k": 7, "verdict": "ENOUGH", "score": 0.9}],
              "b": [{"k": 2, "verdict": "ENOUGH", "score": 0.4}]}
    settings = AuditSettings(threshold=0.5, target_pass=0.5, sample=3, config="demo.yaml")
    s = write_audit(tmp_path, rows(), settings, stored=stored, title="demo")
    assert json.loads((tmp_path / AUDIT_JSON).read_text()) == s
    assert s["format"] == AUDIT_FORMAT and s["settings"]["config"] == "demo.yaml"
    assert s["counts"] == {"rows": 3, "probes": 14, "scored_rows": 3, "rollout_points": 7,
                           "rollout_samples": 28, "rollout_tokens": 250,
                           "mean_sentences": pytest.approx(14 / 3)}
    assert (s["monotonicity"]["breaks"], s["monotonicity"]["flips"],
            s["monotonicity"]["drops"], s["monotonicity"]["rows_with_breaks"]) == (2, 1, 1, 1)
    assert s["binary_vs_scan"] == {"rows": 3, "differ": 1, "share": pytest.approx(1 / 3),
                                   "binary_longer": 1, "binary_shorter": 0, "ids": ["a"]}
    # Points (P, pass rate): a (.7,.25) (.3,.5) (.9,1); b (.2,0) (.6,.75) (.8,1); c (.9,.25).
    # At P >= 0.5 against pass >= 0.5: tp .9 .6 .8, fp .7 .9, fn .3, tn .2.
    a = s["agreement"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"], a["points"]) == (3, 2, 1, 1, 7)
    assert a["accuracy"] == pytest.approx(4 / 7)
    assert a["balanced_accuracy"] == pytest.approx(13 / 24)
    assert a["auc"] == pytest.approx(6.5 / 12)  # the 0.9 tie counts half
    # Candidates .25 .45 .65 .75 .85 give 2/3, 13/24, 5/12, 7/12, 11/24.
    th = s["threshold"]
    assert (th["current"], th["suggested"], th["tied"]) == (0.5, 0.25, [0.25, 0.25])
    assert th["suggested_balanced_accuracy"] == pytest.approx(2 / 3)
    assert th["current_balanced_accuracy"] == pytest.approx(13 / 24)
    f = s["finish"]
    # At 0.5 the scan keeps a 2 (.25), b 3 (.75), c 1 (.25), all rolled out there.
    assert f["at_current"]["rate"] == pytest.approx(1.25 / 3)
    assert (f["at_current"]["exact"], f["at_current"]["interpolated"]) == (3, 0)
    # At 0.25, b keeps 2, between its points 1 (0) and 3 (.75): .375, interpolated.
    assert f["at_suggested"]["rate"] == pytest.approx(0.875 / 3)
    assert (f["at_suggested"]["exact"], f["at_suggested"]["interpolated"]) == (2, 1)
    assert f["at_binary"] == {"rows": 3, "rate": pytest.approx(2 / 3),
                              "continuation_rate": pytest.approx(0.5)}  # a's 7: 2 from prefix
    assert f["at_scan"]["rate"] == pytest.approx(1.25 / 3)
    bins = s["reliability"]["bins"]
    assert [b["n"] for b in bins] == [0, 0, 1, 1, 0, 0, 1, 1, 1, 2]
    assert bins[9]["pass_rate"] == 0.625 and bins[9]["mean_score"] == pytest.approx(0.9)
    assert s["stored"] == {"rows": 2, "probes": 3, "max_abs_dp": pytest.approx(0.01),
                           "verdicts_differ": 1}
    assert [r["id"] for r in s["rows"]] == ["a", "b", "c"]
    assert s["rows"][0]["rollouts"] == [[2, 1, 4], [4, 2, 4], [7, 4, 4]]

    md = (tmp_path / AUDIT_MD).read_text()
    for heading in ("# Judge audit", "## Monotonicity", "## Binary search against a full scan",
                    "## Agreement with the rollouts", "## Threshold",
                    "## Finish rates at the chosen prefixes", "## Reliability",
                    "## Stored probes reproduced", "## Rows"):
        assert heading in md
    assert "| suggested | 0.250 | 0.667 | 0.292 | 3 (2) |" in md
    assert "2 breaks in 1 of 3 rows: 1 where ENOUGH turns NOT_ENOUGH, 1 more where P" in md
    for png in (CALIBRATION_PNG, CURVES_PNG):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_generated_verdicts_still_audit_but_cannot_calibrate(tmp_path):
    probes = [Probe(1, "NOT_ENOUGH", None), Probe(2, "ENOUGH", None),
              Probe(3, "NOT_ENOUGH", None), Probe(4, "ENOUGH", None)]
    row = with_rollouts(audit_row("g", 4, 0.5, "generate", probes), [Rollout(2, 2, 1)])
    many = [AuditRow.from_record({**row.to_record(), "id": f"g{i:02d}"}) for i in range(20)]
    s = write_audit(tmp_path / "audit", many, AuditSettings(threshold=0.5,
                                                             verdict_mode="generate"))
    assert s["agreement"] is None and s["threshold"]["suggested"] is None
    assert "verdict: score" in s["threshold"]["why_none"]
    assert s["monotonicity"]["flips"] == 20 and s["binary_vs_scan"]["differ"] == 0
    assert s["finish"]["at_binary"]["rate"] == 0.5
    md = (tmp_path / "audit" / AUDIT_MD).read_text()
    assert "calibration needs verdict: score" in md and "(first 50 of" not in md
    assert (tmp_path / "audit" / CURVES_PNG).read_bytes().startswith(PNG)  # 16 of 20 rows
    assert (tmp_path / "audit" / CALIBRATION_PNG).read_bytes().startswith(PNG)
