"""What an engine stage is, in one place; the generic worker and runner run any of them.

A :class:`Stage` says which config section is its own, which model its engine serves, whether
it needs an engine (for a config, and for a set of rows) or a grader, how it processes a batch
of rows, what its finished records tell the metrics, and its summary statistics. Each stage
module (``generate``, ``truncate``, ``align``, ``evaluate``) defines its own; ``registry``
lists them. Pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from palign.config import Config
from palign.stages.outcome import Outcome

Row = dict[str, Any]
# (rows, engine or None, grader or None, the stage's config section) -> (outcomes, engine calls)
Process = Callable[[list[Row], Any, Any, Any], tuple[list[Outcome], int]]


@dataclass(frozen=True)
class BatchMetrics:
    """What one batch of finished records adds to the stage's metrics (``palign.telemetry``)."""

    tokens: int = 0  # engine tokens the records account for
    probes: int = 0  # judge verdicts asked for
    ratios: tuple[float, ...] = ()  # the share of each CoT kept as prefix


def _no_metrics(records: Sequence[Row]) -> BatchMetrics:
    return BatchMetrics()


def _no_stats(rows: Sequence[Row]) -> dict[str, float]:
    return {}


def _every_row(rows: Sequence[Row]) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    model: Callable[[Config], str | None]  # the model its engine serves (None: none, or per run)
    process: Process
    needs_engine: Callable[[Config], bool]  # for this config (truncate `full` needs none)
    grades: bool = False  # needs a grading worker (math-verify)
    # Whether these pending rows need the engine at all (generate: only rows without a CoT).
    engine_for: Callable[[Sequence[Row]], bool] = _every_row
    metrics: Callable[[Sequence[Row]], BatchMetrics] = _no_metrics
    stats: Callable[[Sequence[Row]], dict[str, float]] = _no_stats  # over all finished rows

    def section(self, cfg: Config) -> Any:
        """The stage's own config section (``cfg.truncate`` for truncate, ...)."""
        return getattr(cfg, self.name)


def field_tokens(name: str) -> Callable[[Sequence[Row]], BatchMetrics]:
    """Metrics that count the engine tokens in one integer field of each record."""

    def metrics(records: Sequence[Row]) -> BatchMetrics:
        return BatchMetrics(tokens=sum(int(r.get(name) or 0) for r in records))

    return metrics
