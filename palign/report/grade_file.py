"""`palign grade FILE`: grade an existing JSONL of generations (one row per problem, the gold
answer and a list of outputs) and report pass@1 and pass@k for every k up to n, in the strict
extraction mode (last box), the flexible one (math-verify's own extraction) or both.

The report: ``problems``, ``samples``, ``n_min``, ``n_max``, ``skipped`` and ``extract`` (the
modes graded); the strict figures (``pass@k``, ``no_answer_share``, ``timeouts``, ``errors``)
at the top level, and the same keys for the flexible mode in a ``flexible`` object. A mode not
graded has no figures at all, so a strict figure is never mistaken for a flexible one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palign.data.lines import Unreadable, iter_jsonl
from palign.method.grading import FLEXIBLE, STRICT, ExtractMode, Grader
from palign.method.metrics import GradeTally

# The --extract choices and the modes each one grades.
EXTRACT_CHOICES: dict[str, tuple[ExtractMode, ...]] = {
    "strict": (STRICT,), "flexible": (FLEXIBLE,), "both": (STRICT, FLEXIBLE)}


def _read_row(row: Any, lineno: int, answer_field: str,
              output_field: str) -> tuple[str, list[str]] | dict[str, Any]:
    """(gold, outputs) of one JSONL row, or the skip record saying why it cannot be graded."""
    if isinstance(row, Unreadable):
        return {"line": lineno, "reason": row.reason}
    gold = row.get(answer_field) if isinstance(row, dict) else None
    outputs = row.get(output_field) if isinstance(row, dict) else None
    if isinstance(outputs, str):
        outputs = [outputs]
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return {"line": lineno, "reason": f"no usable {answer_field!r}"}
    if (not isinstance(outputs, list) or not outputs
            or not all(isinstance(o, str) for o in outputs)):
        return {"line": lineno, "reason": f"{output_field!r} is not a non-empty list of strings"}
    return gold, outputs


def grade_file(path: str | Path, answer_field: str = "answer", output_field: str = "output",
               timeout_s: float = 5.0, extract: str = "both") -> dict[str, Any]:
    """Grade every row in the modes ``extract`` names (strict, flexible or both; see the module
    docstring for the report). Rows without a usable answer or outputs are counted and skipped,
    with their line number and reason in ``skipped``. Raises ValueError for an unknown
    ``extract`` or a file with no gradable row, OSError when it cannot be read."""
    if extract not in EXTRACT_CHOICES:
        raise ValueError(f"extract must be one of {list(EXTRACT_CHOICES)}, got {extract!r}")
    modes = EXTRACT_CHOICES[extract]
    tallies = {m: GradeTally() for m in modes}
    skipped: list[dict[str, Any]] = []
    with Grader(timeout_s=timeout_s) as grader:
        for lineno, row in iter_jsonl(path):
            parsed = _read_row(row, lineno, answer_field, output_field)
            if isinstance(parsed, dict):
                skipped.append(parsed)
                continue
            gold, outputs = parsed
            for mode in modes:
                grades = [grader.grade(o, gold, mode) for o in outputs]
                tallies[mode].add((g.correct, g.status) for g in grades)
    if not tallies[modes[0]].problems:
        raise ValueError(f"{path}: no gradable rows ({len(skipped)} skipped)")
    report: dict[str, Any] = {"extract": list(modes)}
    if STRICT in modes:
        report.update(tallies[STRICT].figures())
    if FLEXIBLE in modes:
        report[FLEXIBLE] = tallies[FLEXIBLE].figures()
    report.update({**tallies[modes[0]].counts(), "skipped": skipped})
    return report


def _mode_figures(report: dict[str, Any], mode: str) -> dict[str, Any]:
    return report if mode == STRICT else report[mode]


def format_report(report: dict[str, Any]) -> str:
    """The printed report: a line of counts, then a table with a row per extraction mode (its
    pass@k side by side with the other mode's), then the skipped lines."""
    modes = report["extract"]
    keys = [k for k in _mode_figures(report, modes[0]) if k.startswith("pass@")]
    lines = [f"{report['problems']} problems, {report['samples']} samples "
             f"(n {report['n_min']}..{report['n_max']})",
             " | ".join(["extract", *keys, "no answer", "timeouts", "errors"])]
    for mode in modes:
        m = _mode_figures(report, mode)
        lines.append(" | ".join([mode, *[f"{m[k]:.4f}" for k in keys],
                                 f"{m['no_answer_share']:.1%}", str(m["timeouts"]),
                                 str(m["errors"])]))
    for s in report["skipped"]:
        lines.append(f"skipped line {s['line']}: {s['reason']}")
    return "\n".join(lines)
