"""What a stage is: one class the generic runner, worker, summary and preflight ask everything.

A :class:`Stage` names its config section, the model its engine serves, whether it needs an
engine (for a config, and for the rows to do) or a grader, how it processes a batch of rows
(``process``), what its finished records tell the metrics and put in the shard index, its
summary statistics (from the index), its prompt texts (part of its fingerprint), the models
preflight checks for it, and what the config asks of a run that executes it (``check``, the
``output_budget`` that must leave room for a prompt). The defaults are those of a stage that
needs nothing special; each stage module (``generate``, ``truncate``, ``align``, ``train``,
``evaluate``) overrides what it differs in, and holds its section class beside it. The list of
stages lives once, in ``palign.config.stages``.

A stage holds no state: a Ray actor builds its own instance by import, so anything a batch
needs comes in its :class:`Context`. Pure: no Ray.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from palign.common.failures import ROW

if TYPE_CHECKING:
    from palign.config import Config
    from palign.engines.base import Engine

Row = dict[str, Any]


@dataclass
class Outcome:
    """What a stage made of one row: a finished record, or a reject with its reason and kind."""

    id: str
    record: dict[str, Any] | None = None  # the output row, when the row went through
    reason: str | None = None  # why it was rejected, otherwise
    kind: str = ROW  # whose fault the reject is: "row" or "system" (see palign.common.failures)

    @property
    def ok(self) -> bool:
        return self.reason is None


def rejected(row: Row, reason: str, kind: str = ROW) -> Outcome:
    return Outcome(str(row.get("id")), None, reason, kind)


@dataclass(frozen=True)
class BatchMetrics:
    """What one batch of finished records adds to the stage's metrics
    (``palign.runtime.telemetry``)."""

    tokens: int = 0  # engine tokens the records account for
    probes: int = 0  # judge verdicts asked for
    ratios: tuple[float, ...] = ()  # the share of each CoT kept as prefix
    prefill: tuple[float, ...] = ()  # judge prompt tokens computed over the longest, per row


def field_tokens(records: Sequence[Row], name: str) -> BatchMetrics:
    """Metrics that count the engine tokens in one integer field of each record."""
    return BatchMetrics(tokens=sum(int(r.get(name) or 0) for r in records))


@dataclass
class Context:
    """What the worker hands a batch: the engine (None when the stage needs none for these
    rows), the grading worker (None unless the stage ``needs_grader``) and the stage's section."""

    engine: Engine | None
    grader: Any
    section: Any


class Stage(ABC):
    """One step of the pipeline. Subclasses set the class attributes and override the methods
    they differ in; ``process`` is the one every stage must write."""

    name: ClassVar[str]  # its key in run.stages, its config section and its output folder
    description: ClassVar[str] = ""
    Section: ClassVar[type[Any]]  # the class of its config section (``cfg.<name>``)
    # Who runs it: ``rows`` the generic actor pool (palign.runtime.runner), ``evaluate`` one
    # pool per model under test and benchmark (palign.runtime.evaluate), ``train`` Ray Train.
    driver: ClassVar[Literal["rows", "evaluate", "train"]] = "rows"
    grades: ClassVar[bool] = False  # needs a grading worker (math-verify)
    # Whether its engine may be a remote endpoint (engine.backend: openai): only a stage that
    # asks its engine for chat completions alone (no label scores, no assistant prefix).
    remote_engine: ClassVar[bool] = False
    input_columns: ClassVar[tuple[str, ...]] = ()  # of its input's index, for engine_for
    # What a finished record puts in its shard's index (palign.data.shards): the few numbers
    # the summary needs, so that summaries never read whole rows.
    index_columns: ClassVar[tuple[str, ...]] = ()

    def section(self, cfg: Config) -> Any:
        """The stage's own config section (``cfg.truncate`` for truncate, ...)."""
        return getattr(cfg, self.name)

    def model(self, cfg: Config) -> str | None:
        """The model its engine serves (None: none, or one named per run)."""
        return None

    def needs_engine(self, cfg: Config) -> bool:
        """Whether this config runs an engine for it at all (truncate ``full`` needs none)."""
        return getattr(self.section(cfg), "engine", None) is not None

    def engine_for(self, columns: Mapping[str, Sequence[Any]]) -> bool:
        """Whether the rows to do need the engine, from the ``input_columns`` of their
        input's index (column -> values of the rows to do); generate: only rows without a CoT."""
        return True

    def needs_grader(self, section: Any) -> bool:
        """Whether its actors start a grading worker, from its section (default: ``grades``);
        a stage that grades only for an optional step says so here (truncate's verify)."""
        return self.grades

    def grade_timeout(self, section: Any) -> float:
        """The seconds one grading may take, from its section (default: its
        ``grade_timeout_s``); asked only when ``needs_grader`` says yes."""
        return float(section.grade_timeout_s)

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        """The models it will load, each with the field that names it (preflight checks them)."""
        return []

    def prompts(self) -> dict[str, Any]:
        """The prompt texts it sends, placeholders where a row's text goes (its fingerprint)."""
        return {}

    def check(self, cfg: Config) -> list[str]:
        """What a config that runs this stage lacks, a line per problem naming its field
        (``models.teacher: ...``); the config refuses itself with them. Only asked of the
        stages the run executes."""
        return []

    def output_budget(self, section: Any) -> tuple[str, int | None] | None:
        """The field of its section that bounds the tokens one output may take, and its value
        (None: up to the context), so the config can refuse a budget that leaves no room for a
        prompt in ``engine.max_model_len``; None: it generates nothing. By default a section's
        ``sampling.max_tokens``, when it has one."""
        sampling = getattr(section, "sampling", None)
        if sampling is None or getattr(section, "engine", None) is None:
            return None
        return "sampling.max_tokens", sampling.max_tokens

    @abstractmethod
    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        """An outcome per row, in order. A row's own fault is a reject; a raise is the
        machinery's (the worker retries or isolates the batch)."""

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return BatchMetrics()

    def index(self, record: Row) -> dict[str, Any]:
        return {}

    def subfolder(self, row: Row) -> str:
        """Where under the stage's folder a row's result goes ("" for the folder itself;
        evaluate: <model>/<benchmark>)."""
        return ""

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """The summary statistics, from the index columns of all finished rows."""
        return {}

    def reject_stats(self, reasons: Sequence[str], kept: int) -> dict[str, float]:
        """More statistics from the rejects' reasons and the count of kept rows."""
        return {}

    def index_values(self, records: Sequence[Row]) -> dict[str, list[Any]]:
        """The index columns for these finished records, one value per record."""
        entries = [self.index(r) for r in records]
        return {c: [e.get(c) for e in entries] for c in self.index_columns}


class RowStage(Stage):
    """A stage that handles each row on its own, as a coroutine: the rows of a batch run
    together (an engine's ``agenerate`` answers each as it finishes). For work whose engine
    call must stay one batch (a seeded sampling call), write ``process`` instead."""

    @abstractmethod
    async def process_row(self, row: Row, ctx: Context) -> Outcome:
        """The outcome of one row."""

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        # The worker calls this on a batch's own thread: a loop of its own, no shared one.
        return asyncio.run(self._all(rows, ctx))

    async def _all(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        return list(await asyncio.gather(*(self.process_row(r, ctx) for r in rows)))
