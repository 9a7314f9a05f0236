"""pass@k over graded samples: pass@1 is mean correctness; pass@k the unbiased estimator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from palign.core.grading import STATUS_ERROR, STATUS_NO_ANSWER, STATUS_TIMEOUT


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
