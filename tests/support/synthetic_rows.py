"""Synthetic rows for tests: align-stage rows for the training tests (short additions worked
step by step, a draft and a continuation each, of unequal lengths: a seeded draw per row), and
truncate-input rows whose CoT scripts the judge (``scripted_engines.ScriptedJudge``)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from palign.method.targets import training_target


def addition_rows(n: int, *, seed: int, max_steps: int, id_width: int = 2,
                  answer: bool = True) -> list[dict]:
    """``n`` rows ``row-<i>`` (``i`` padded to ``id_width``): "What is a + b?", a draft of 1 to
    ``max_steps - 1`` steps, and the boxed sum; ``answer`` adds the gold answer field."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps = " ".join(f"Add {k} to get {a + k}." for k in range(1, rng.randint(2, max_steps)))
        row = {"id": f"row-{i:0{id_width}d}", "question": f"What is {a} + {b}?"}
        if answer:
            row["answer"] = str(a + b)
        row["target"] = training_target(f"We add {a} and {b}. {steps}",
                                        f"So the sum is \\boxed{{{a + b}}}.")
        rows.append(row)
    return rows


def rows_with_curve(curves: Sequence[Sequence[float]],
                    rates: Sequence[Sequence[tuple[int, int] | None]] | None = None, *,
                    gold: str = "42", prefix: str = "curve") -> list[dict]:
    """Truncate-input rows ``<prefix>-<i>`` whose sentence j carries the marker
    ``[p curves[i][j] r R/D]`` (``rates[i][j]`` = (R, D); None or no ``rates``: no ``r``), so
    ScriptedJudge scores the prefix of k sentences ``curves[i][k-1]`` and a rollout from it
    passes R of every D samples (none without an ``r`` up to k). The question names ``gold``
    as ``(answer gold)``, and ``answer`` is ``gold``."""
    rows = []
    for i, curve in enumerate(curves):
        row_rates = list(rates[i]) if rates is not None else [None] * len(curve)
        if len(row_rates) != len(curve):
            raise ValueError(f"row {i}: {len(curve)} scores but {len(row_rates)} rates")
        sentences = []
        for j, (p, rate) in enumerate(zip(curve, row_rates)):
            r = f" r {rate[0]}/{rate[1]}" if rate is not None else ""
            sentences.append(f"Step {j + 1} works [p {float(p)!r}{r}].")
        rows.append({"id": f"{prefix}-{i:02d}",
                     "question": f"Find the value of x. (answer {gold})",
                     "answer": gold, "cot": " ".join(sentences)})
    return rows
