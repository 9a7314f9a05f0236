import json

import pytest

from palign.cli import main


def test_palign_grade_reports_pass_at_k(tmp_path, capsys):
    rows = [
        {"answer": "204", "output": ["so \\boxed{204}", "\\boxed{205}", "no box here"]},
        {"answer": "0.5", "output": ["\\boxed{\\frac{1}{2}}", "\\boxed{1/2}", "\\boxed{0.5}"]},
        {"answer": "3", "output": ["\\boxed{4}", "\\boxed{5}", "\\boxed{"]},
        {"answer": "1", "output": "not a list but a string \\boxed{1}"},
        {"output": ["\\boxed{1}"]},
    ]
    path = tmp_path / "gens.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "report.json"
    assert main(["grade", str(path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 4 and report["n_min"] == 1
    # n differs across rows, so only pass@1 is defined for all: (1/3 + 1 + 0 + 1) / 4
    assert report["pass@1"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    assert "pass@2" not in report
    assert report["no_answer_share"] == pytest.approx(2 / 10)
    assert [s["line"] for s in report["skipped"]] == [5, 6]
    assert "pass@1" in capsys.readouterr().out


def test_pass_at_k_for_every_k_up_to_n(tmp_path):
    rows = [{"gold": "7", "gens": ["\\boxed{7}", "\\boxed{8}", "\\boxed{9}"]},
            {"gold": "2", "gens": ["\\boxed{1}", "\\boxed{1}", "\\boxed{1}"]}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["grade", str(path), "--answer-field", "gold", "--output-field", "gens",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pass@1"] == pytest.approx(1 / 6)
    assert report["pass@2"] == pytest.approx((2 / 3) / 2)
    assert report["pass@3"] == pytest.approx(0.5)
    assert main(["grade", str(tmp_path / "missing.jsonl")]) == 2
