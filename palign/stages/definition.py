"""What an engine stage is, in one place; the generic worker and runner run any of them.

A :class:`Stage` says which config section is its own, which model its engine serves, whether
it needs an engine (for a config, and for the rows to do) or a grader, how it processes a batch
of rows, what its finished records tell the metrics and put in the shard index, and its summary
statistics (from the index). Each stage
module (``generate``, ``truncate``, ``align``, ``evaluate``) defines its own; ``registry``
lists them. Pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from palign.core.config import Config
from palign.stages.outcome import Outcome

Row = dict[str, Any]
# (rows, engine or None, grader or None, the stage's config section) -> an outcome per row
Process = Callable[[list[Row], Any, Any, Any], list[Outcome]]


@dataclass(frozen=True)
class BatchMetrics:
    """What one batch of finished records adds to the stage's metrics
    (``palign.runtime.telemetry``)."""

    tokens: int = 0  # engine tokens the records account for
    probes: int = 0  # judge verdicts asked for
    ratios: tuple[float, ...] = ()  # the share of each CoT kept as prefix
    prefill: tuple[float, ...] = ()  # judge prompt tokens computed over the longest, per row


def _no_metrics(records: Sequence[Row]) -> BatchMetrics:
    return BatchMetrics()


def _no_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    return {}


def _no_index(record: Row) -> dict[str, Any]:
    return {}


def _every_row(columns: Mapping[str, Sequence[Any]]) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    model: Callable[[Config], str | None]  # the model its engine serves (None: none, or per run)
    process: Process
    needs_engine: Callable[[Config], bool]  # for this config (truncate `full` needs none)
    grades: bool = False  # needs a grading worker (math-verify)
    # Whether the rows to do need the engine at all (generate: only rows without a CoT), from
    # the ``input_columns`` of their input's index (column -> values of the rows to do).
    engine_for: Callable[[Mapping[str, Sequence[Any]]], bool] = _every_row
    input_columns: tuple[str, ...] = ()
    metrics: Callable[[Sequence[Row]], BatchMetrics] = _no_metrics
    # What a finished record puts in its shard's index (palign.core.shards): the few numbers the
    # summary needs, so that summaries never read whole rows. ``index_columns`` names them.
    index: Callable[[Row], dict[str, Any]] = _no_index
    # Where under the stage's folder a row's result goes ("" for the folder itself; evaluate:
    # <model>/<benchmark>).
    subfolder: Callable[[Row], str] = lambda row: ""
    index_columns: tuple[str, ...] = ()
    # The summary statistics, from the index columns of all finished rows (column -> values).
    stats: Callable[[Mapping[str, Sequence[Any]]], dict[str, float]] = _no_stats
    # More statistics from the rejects' reasons and the count of kept rows (align: dropped).
    reject_stats: Callable[[Sequence[str], int], dict[str, float]] = lambda reasons, kept: {}

    def index_values(self, records: Sequence[Row]) -> dict[str, list[Any]]:
        """The index columns for these finished records, one value per record."""
        entries = [self.index(r) for r in records]
        return {c: [e.get(c) for e in entries] for c in self.index_columns}

    def section(self, cfg: Config) -> Any:
        """The stage's own config section (``cfg.truncate`` for truncate, ...)."""
        return getattr(cfg, self.name)


def field_tokens(name: str) -> Callable[[Sequence[Row]], BatchMetrics]:
    """Metrics that count the engine tokens in one integer field of each record."""

    def metrics(records: Sequence[Row]) -> BatchMetrics:
        return BatchMetrics(tokens=sum(int(r.get(name) or 0) for r in records))

    return metrics
