"""`palign grade FILE`: grade an existing JSONL of generations (one row per problem, the gold
answer and a list of outputs) and report pass@1 and pass@k for every k up to n."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palign.grading import Grader
from palign.metrics import pass_at_ks


def grade_file(path: str | Path, answer_field: str = "answer", output_field: str = "output",
               timeout_s: float = 5.0) -> dict[str, Any]:
    """Grade every row; rows without a usable answer or outputs are counted and skipped, with
    their line number and reason in ``skipped``."""
    correct: list[list[bool]] = []
    statuses: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    with Grader(timeout_s=timeout_s) as grader, open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.append({"line": lineno, "reason": f"invalid JSON: {err.msg}"})
                continue
            gold = row.get(answer_field) if isinstance(row, dict) else None
            outputs = row.get(output_field) if isinstance(row, dict) else None
            if isinstance(outputs, str):
                outputs = [outputs]
            if isinstance(gold, (int, float)) and not isinstance(gold, bool):
                gold = str(gold)
            if not isinstance(gold, str) or not gold.strip():
                skipped.append({"line": lineno, "reason": f"no usable {answer_field!r}"})
                continue
            if (not isinstance(outputs, list) or not outputs
                    or not all(isinstance(o, str) for o in outputs)):
                skipped.append({"line": lineno,
                                "reason": f"{output_field!r} is not a non-empty list of strings"})
                continue
            grades = [grader.grade(o, gold) for o in outputs]
            for g in grades:
                statuses[g.status] = statuses.get(g.status, 0) + 1
            correct.append([g.correct for g in grades])
    if not correct:
        raise ValueError(f"{path}: no gradable rows ({len(skipped)} skipped)")
    samples = sum(len(c) for c in correct)
    return {
        **pass_at_ks(correct),
        "problems": len(correct),
        "samples": samples,
        "n_min": min(len(c) for c in correct),
        "n_max": max(len(c) for c in correct),
        "no_answer_share": statuses.get("no_answer", 0) / samples,
        "timeouts": statuses.get("timeout", 0),
        "errors": statuses.get("error", 0),
        "skipped": skipped,
    }


def format_report(report: dict[str, Any]) -> str:
    keys = [k for k in report if k.startswith("pass@")]
    lines = [" | ".join(["problems", "samples", *keys, "no answer", "timeouts"]),
             " | ".join([str(report["problems"]), str(report["samples"]),
                         *[f"{report[k]:.4f}" for k in keys],
                         f"{report['no_answer_share']:.1%}", str(report["timeouts"])])]
    for s in report["skipped"]:
        lines.append(f"skipped line {s['line']}: {s['reason']}")
    return "\n".join(lines)
