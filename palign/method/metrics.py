"""pass@k over graded samples: pass@1 is mean correctness; pass@k the unbiased estimator.

The one home of the grading summary: ``GradeTally`` collects one extraction mode's graded
samples problem by problem, and ``grade_figures`` turns them into pass@k and the status
shares that ``palign grade`` (palign.report.grade_file) and the evaluation results
(palign.report) both report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from palign.method.grading import STATUS_ERROR, STATUS_NO_ANSWER, STATUS_TIMEOUT


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that k samples drawn without replacement from n, c of them correct, hold at least
    one correct one: 1 - C(n-c, k) / C(n, k), computed as a product to stay exact for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_ks(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """``pass@k`` for every k up to the smallest sample count, averaged over problems."""
    if not correct or any(len(c) == 0 for c in correct):
        raise ValueError("every problem needs at least one graded sample")
    n_min = min(len(c) for c in correct)
    return {
        f"pass@{k}": sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct)
        for k in range(1, n_min + 1)
    }


def grade_figures(correct: Sequence[Sequence[bool]], statuses: Mapping[str, int]) -> dict[str, Any]:
    """The figures of one extraction mode over graded problems: ``pass@k`` for every k up to the
    smallest sample count, ``no_answer_share`` (of all samples), ``timeouts`` and ``errors``
    (counts). ``statuses`` counts the samples by grade status."""
    samples = sum(len(c) for c in correct)
    return {
        **pass_at_ks(correct),
        "no_answer_share": statuses.get(STATUS_NO_ANSWER, 0) / samples,
        "timeouts": statuses.get(STATUS_TIMEOUT, 0),
        "errors": statuses.get(STATUS_ERROR, 0),
    }


@dataclass
class GradeTally:
    """One extraction mode's graded samples, problem by problem: whether each counts as correct
    (``correct``, a list per problem) and how many samples had each grade status."""

    correct: list[list[bool]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, grades: Iterable[tuple[bool, str]]) -> None:
        """One problem's samples, each as (counts as correct, grade status)."""
        marks = []
        for correct, status in grades:
            marks.append(correct)
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.correct.append(marks)

    @property
    def problems(self) -> int:
        return len(self.correct)

    def counts(self) -> dict[str, int]:
        """``problems``, ``samples`` and the fewest and most samples of a problem (``n_min``,
        ``n_max``); ValueError when no problem was added."""
        if not self.correct:
            raise ValueError("no graded problem")
        sizes = [len(c) for c in self.correct]
        return {"problems": len(sizes), "samples": sum(sizes), "n_min": min(sizes),
                "n_max": max(sizes)}

    def figures(self) -> dict[str, Any]:
        """``grade_figures`` of the samples added so far."""
        return grade_figures(self.correct, self.statuses)
