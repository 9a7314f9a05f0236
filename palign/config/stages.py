"""The list of stages, in pipeline order: the one place a stage is registered.

Each entry names the stage's class by import path (``"palign.stages.truncate:Truncate"``). The
config is the lowest layer that reads the list (which names ``run.stages`` takes, which
sections have an engine), so it cannot import the stages (they import the config); it imports
a stage's class by its path when first asked, and keeps it. Everything else (the CLI, preflight,
the runner, fingerprints, summaries) asks here or through ``palign.stages.registry``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from palign.common.plugins import load_object

_STAGES: dict[str, str] = {
    "generate": "palign.stages.generate:Generate",
    "truncate": "palign.stages.truncate:Truncate",
    "align": "palign.stages.align:Align",
    "train": "palign.stages.train:Train",
    "evaluate": "palign.stages.evaluate:Evaluate",
}


def stage_names() -> tuple[str, ...]:
    """Every stage, in the order a run executes them."""
    return tuple(_STAGES)


def stage_entries() -> tuple[tuple[str, str], ...]:
    """Every stage with its class's import path, in order: what the config's model is built
    from (``config_model()`` builds one per distinct list, so a change here is a new model)."""
    return tuple(_STAGES.items())


def stage_path(name: str) -> str:
    """The import path of stage ``name``'s class: how a process that has not registered the
    stage itself (a Ray actor) finds it."""
    return _STAGES[name]


def stage_class(name: str) -> Any:
    """The class of stage ``name`` (a ``palign.stages.base.Stage``), imported on first use."""
    return _load(_STAGES[name])


@cache
def _load(path: str) -> Any:
    return load_object(path, "run.stages")


def engine_stage_names() -> tuple[str, ...]:
    """The stages whose section has an ``engine`` (the top-level ``engine:`` is merged into
    each), in pipeline order."""
    return tuple(n for n in _STAGES
                 if "engine" in getattr(stage_class(n).Section, "model_fields", {}))


def stages_before(listed: Iterable[str], stage: str) -> list[str]:
    """Those of ``listed`` that come before ``stage`` in pipeline order (``stage`` need not
    be listed): the last of them makes its input."""
    order = list(_STAGES)
    return [s for s in listed if order.index(s) < order.index(stage)]


@contextmanager
def registered(name: str, path: str, after: str | None = None) -> Iterator[None]:
    """Add stage ``name`` (class at ``path``) to the list for the ``with`` block, right after
    ``after`` (default: last); for tests, which bring their own stage. Inside the block the
    config has its section (``config_model()`` follows the list), the CLI its subcommand; a Ray
    actor finds the class by ``path``, so its module must be importable there too."""
    if name in _STAGES:
        raise ValueError(f"a stage named {name!r} is already registered")
    saved = dict(_STAGES)
    items = list(_STAGES.items())
    at = len(items) if after is None else list(_STAGES).index(after) + 1
    items.insert(at, (name, path))
    _STAGES.clear()
    _STAGES.update(items)
    try:
        yield
    finally:
        _STAGES.clear()
        _STAGES.update(saved)
