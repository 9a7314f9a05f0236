"""Every stage by name, as an instance: ``get("truncate")``. The list itself, with its order, is
``palign.config.stages``; this module only builds the stages it names.

Stages hold no state, so one instance per class serves every caller (a Ray actor builds its
own by import)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache

from palign.common.plugins import load_object
from palign.config import stage_class, stage_names
from palign.stages.base import Stage


def get(name: str) -> Stage:
    """The stage ``name``; KeyError for a name that is not in the list."""
    return _instance(stage_class(name))


def by_path(path: str) -> Stage:
    """The stage whose class is at ``path`` (``"palign.stages.truncate:Truncate"``): how a Ray
    actor builds its stage, since a stage a test registered is in the driver's list only."""
    return _instance(load_object(path, "stage class"))


@cache
def _instance(cls: type[Stage]) -> Stage:
    return cls()


class _Registry(Mapping[str, Stage]):
    """The list of stages as a mapping, read afresh on each use (a test may add a stage)."""

    def __getitem__(self, name: str) -> Stage:
        return get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(stage_names())

    def __len__(self) -> int:
        return len(stage_names())


REGISTRY: Mapping[str, Stage] = _Registry()
