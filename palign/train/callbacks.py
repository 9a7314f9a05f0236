"""Train callbacks: objects named in ``train.callbacks`` that every training process calls.

A callback is a class named by import path (``train.callbacks: [{path: "pkg.module:Name",
kwargs: {...}}]``, loaded by ``palign.common.plugins``), made once per process with its
``kwargs`` and called after each optimizer step, once that step's checkpoint (if it has one)
is saved and published: whatever it raises fails the run there, as a crash would, and the
run resumes from that checkpoint. The tests inject their training failures this way
(``tests/support/train_faults.py``), so the loop holds no test hook. The module must import on
every training process: under Ray Train and torchrun that means on the workers'
``PYTHONPATH`` (palign forwards the driver's, see ``palign.runtime.environment``).

Callbacks are operational: they are left out of the train fingerprint, so a resume with other
callbacks (or none) goes on (``palign.train.identity``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from palign.common.plugins import load_object
from palign.config import ConfigError
from palign.stages.train import TrainSection


@runtime_checkable
class StepCallback(Protocol):
    def on_step_end(self, done: int, start_step: int, rank: int) -> None:
        """Called by every rank after optimizer step ``done`` (1-based) of a run that
        started after step ``start_step`` (0: from scratch; else the checkpoint it resumed)."""


def load(tc: TrainSection) -> list[StepCallback]:
    """The callbacks ``train.callbacks`` names, made with their kwargs, in order;
    ``ConfigError`` naming the entry for one that cannot be imported or made."""
    made = []
    for i, ref in enumerate(tc.callbacks):
        where = f"train.callbacks[{i}]"
        cls = load_object(ref.path, f"{where}.path")
        try:
            callback = cls(**ref.kwargs)
        except Exception as err:  # a wrong keyword, a bad value: the config's fault
            raise ConfigError(f"{where}: {ref.path}({ref.kwargs}) failed: {err}") from err
        if not isinstance(callback, StepCallback):
            raise ConfigError(f"{where}: {ref.path} has no on_step_end(done, start_step, rank)")
        made.append(callback)
    return made

