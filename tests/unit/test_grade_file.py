import json

import pytest

from palign.cli import main
from palign.report.grade_file import grade_file


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
    # Every answer here is boxed or absent, so the flexible mode agrees.
    assert report["flexible"]["pass@1"] == pytest.approx(report["pass@1"])
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


# Outputs where the extraction modes differ (their grades are pinned in test_grading.py).
LOOP = "Let me recheck... 7 ... wait, let me recheck ... 7 ... wait"
DIFFERING = [
    # strict: no answer, right, no answer; flexible: right, right, no answer
    {"answer": "42", "output": ["Adding 40 and 2 gives 42, so the answer is 42.",
                                "so \\boxed{42}", "I ran out of tokens"]},
    # strict: no answer, wrong, right; flexible: right, wrong, wrong (both boxes as a set)
    {"answer": "7", "output": [LOOP, "\\boxed{8}", "First \\boxed{1}. Wait, no: \\boxed{7}."]},
]


def write_rows(tmp_path, rows):
    path = tmp_path / "gens.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_report_carries_strict_and_flexible_figures(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["grade", str(write_rows(tmp_path, DIFFERING)), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["extract"] == ["strict", "flexible"]
    # Top level: the strict figures, as before flexible grading existed.
    assert report["pass@1"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert report["pass@2"] == pytest.approx(2 / 3)
    assert report["pass@3"] == pytest.approx(1.0)
    assert report["no_answer_share"] == pytest.approx(3 / 6)
    # The same keys for the flexible mode.
    assert report["flexible"] == {
        "pass@1": pytest.approx((2 / 3 + 1 / 3) / 2), "pass@2": pytest.approx((1 + 2 / 3) / 2),
        "pass@3": pytest.approx(1.0), "no_answer_share": pytest.approx(1 / 6),
        "timeouts": 0, "errors": 0}
    assert (report["problems"], report["samples"], report["n_min"]) == (2, 6, 3)
    # Printed: a row per mode, their pass@k side by side.
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split(" | ") == ["extract", "pass@1", "pass@2", "pass@3", "no answer",
                                       "timeouts", "errors"]
    assert printed[2].startswith("strict | 0.3333 | 0.6667 | 1.0000 | 50.0% |")
    assert printed[3].startswith("flexible | 0.5000 | 0.8333 | 1.0000 | 16.7% |")


def test_extract_one_mode_reports_only_that_one(tmp_path, capsys):
    path = write_rows(tmp_path, DIFFERING)
    strict, flexible = tmp_path / "strict.json", tmp_path / "flexible.json"
    assert main(["grade", str(path), "--extract", "strict", "--json", str(strict)]) == 0
    assert main(["grade", str(path), "--extract", "flexible", "--json", str(flexible)]) == 0
    only_strict = json.loads(strict.read_text())
    assert only_strict["extract"] == ["strict"] and "flexible" not in only_strict
    assert only_strict["pass@1"] == pytest.approx(1 / 3)
    only_flexible = json.loads(flexible.read_text())
    # No top-level figures: a flexible number must never pass for a strict one.
    assert only_flexible["extract"] == ["flexible"] and "pass@1" not in only_flexible
    assert only_flexible["flexible"]["pass@1"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "\nflexible | 0.5000 |" in printed and "\nstrict | 0.3333 |" in printed
    with pytest.raises(SystemExit):
        main(["grade", str(path), "--extract", "loose"])
    with pytest.raises(ValueError, match="extract"):
        grade_file(path, extract="loose")


def test_unreadable_lines_are_skipped_with_their_reason(tmp_path):
    path = tmp_path / "gens.jsonl"
    row = json.dumps({"answer": "1", "output": ["\\boxed{1}"]}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\r\n{broken\n\xff" + row + b"\n\n" + row + b"\n")
    report = grade_file(path, extract="strict")
    assert (report["problems"], report["pass@1"]) == (2, 1.0)
    assert [(s["line"], s["reason"].split(":")[0]) for s in report["skipped"]] == [
        (2, "invalid JSON"), (3, "not valid UTF-8")]
