"""What every part of the config shares: the strict base model and the error a config that
cannot run raises, with the one formatter of its message. The stage names are in ``stages``."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from palign.common.failures import ConfigError

__all__ = ["NAME_PATTERN", "ConfigError", "Strict", "format_problems"]

# Folder-safe names for benchmarks and evaluated models (they become output folder names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def format_problems(problems: Iterable[str]) -> str:
    """A ConfigError's message: ``invalid config:`` and a line per problem, each a field's
    dotted path and what is wrong with it (``truncate.threshold: ...``)."""
    return "invalid config:\n" + "\n".join(f"  {p}" for p in problems)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
