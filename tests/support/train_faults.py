"""Training failures on purpose, as a train callback (``train.callbacks``): the resume tests
(tests/integration/test_train.py, tests/integration/test_train_lora.py) stop a run right after
a step's checkpoint.

Imported by import path on every training process (Ray Train's workers, torchrun's ranks):
tests/conftest.py puts this folder on ``PYTHONPATH``."""

from __future__ import annotations

from typing import Any

PATH = "train_faults:FailAfterStep"


class FailAfterStep:
    """Every rank raises right after step ``step`` (and its checkpoint, if any), but only in a
    run that started after step ``resumed_from`` (0: from scratch). Any other start goes
    through: the run resumed after the failure, or Ray's retry of the worker group, which
    resumes from a later checkpoint."""

    def __init__(self, step: int, resumed_from: int = 0) -> None:
        self.step, self.resumed_from = step, resumed_from

    def on_step_end(self, done: int, start_step: int, rank: int) -> None:
        if done == self.step and start_step == self.resumed_from:
            raise RuntimeError(f"FailAfterStep({self.step}, resumed_from={self.resumed_from}): "
                               f"injected failure after step {done}")


def fail_after(step: int, resumed_from: int = 0) -> dict[str, Any]:
    """The ``train.callbacks`` entry that fails after ``step`` in a run that started after
    ``resumed_from``."""
    return {"path": PATH, "kwargs": {"step": step, "resumed_from": resumed_from}}
