"""Synthetic align-stage rows for the training tests: short additions worked step by step, a
draft and a continuation each, of unequal lengths (a seeded draw per row)."""

from __future__ import annotations

import random

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
