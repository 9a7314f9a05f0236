"""What a person reads when a stage ends: its summary (counts from the indexes, statistics,
where its output is) and the one line that says what failed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from palign.common.failures import StageFailed, describe, reject_share_error
from palign.config import Config
from palign.data import storage
from palign.data.digest import count_rows, read_index
from palign.data.layout import DONE_MARKER, REJECTS
from palign.data.shards import reject_reasons
from palign.report.summary_file import summary_record, write_summary
from palign.stages.base import Stage


@dataclass
class StageSummary:
    stage: str
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    skipped: int = 0  # done by an earlier run, not redone
    processed: int = 0  # sent through the actor pool by this run
    # This run's engine work: prompt tokens answered, how many its prefix caches served, the
    # most requests one replica's engine held at once, the slowest replica's start in seconds
    # (init_s) and the tokens its records account for (work_tokens): see
    # palign.report.summary_file.ENGINE_KEYS.
    engine: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    output_dir: str = ""
    model_dir: str | None = None  # train: the exported Hugging Face folder
    report: str | None = None  # evaluate: the results table (Markdown)
    reasons: list[str] = field(default_factory=list, repr=False)  # of the rejects

    def check_rejects(self, field_name: str, limit: float) -> None:
        """Fail (after the stage has written what it has) when its rejects pass ``limit`` of
        its rows, or when nothing came out of it."""
        error = reject_share_error(self.stage, field_name, self.rows_out, self.rejected, limit,
                                   self.reasons)
        if error:
            raise StageFailed(f"{error}. What was written is in {self.output_dir}/.")


def engine_stats(engine: dict[str, float]) -> dict[str, float]:
    """The summary's view of ``StageSummary.engine``: the prefix-cache hit share of the prompt
    tokens and the peak of requests in flight in one engine (nothing when no engine ran)."""
    if not engine.get("prompt_tokens"):
        return {}
    stats = {"engine_prefix_cache_share": engine["cached_tokens"] / engine["prompt_tokens"],
             "engine_peak_in_flight": float(engine["peak_in_flight"])}
    if engine.get("requests"):  # a remote engine: its HTTP requests and how many were retries
        stats.update(engine_requests=float(engine["requests"]),
                     engine_retries=float(engine.get("retries", 0)))
    return stats


def fill_totals(summary: StageSummary, out_dir: str, definition: Stage) -> None:
    """Counts, reject reasons and statistics from the indexes (no row is read), by the stage
    that wrote them (``definition``: a tool's stage may be in no stage list)."""
    index = read_index(out_dir, definition.index_columns)
    summary.rows_out = index.num_rows
    summary.reasons = reject_reasons(out_dir)
    summary.rejected = len(summary.reasons)
    summary.stats = definition.stats({c: _values(index[c]) for c in definition.index_columns})
    summary.stats.update(definition.reject_stats(summary.reasons, summary.rows_out))


def _values(column: Any) -> Any:
    """An index column for the statistics: a numpy array when numeric (8 bytes a row, not a
    Python object; missing values as NaN), else a list."""
    import pyarrow as pa

    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or \
            pa.types.is_boolean(column.type):
        return column.to_numpy()
    return column.to_pylist()


def save_summary(summary: StageSummary) -> str:
    """Keep ``summary`` as ``<its output_dir>/_SUMMARY.json`` (``palign.report.summary_file``:
    the counts, wall time, engine work and statistics, never the reject reasons); returns
    where it went."""
    return write_summary(summary.output_dir, summary_record(
        summary.stage, rows_in=summary.rows_in, rows_out=summary.rows_out,
        rejected=summary.rejected, skipped=summary.skipped, processed=summary.processed,
        wall_s=summary.wall_s, engine=summary.engine, stats=summary.stats))


def ingest_summary(cfg: Config) -> StageSummary | None:
    folder = storage.join(storage.absolute(cfg.run.output_dir), "ingest")
    if not storage.exists(storage.join(folder, DONE_MARKER)):
        return None  # nothing read the run's data (an evaluate-only run)
    out = count_rows(folder)
    reasons = reject_reasons(folder)
    return StageSummary("ingest", rows_in=out + len(reasons), rows_out=out,
                        rejected=len(reasons), output_dir=folder, reasons=reasons)


def format_summary(summaries: list[StageSummary], total_s: float) -> str:
    lines = [f"{'stage':<10}{'in':>6}{'out':>6}{'rejected':>10}{'resumed':>9}{'wall s':>9}"]
    for s in summaries:
        lines.append(f"{s.stage:<10}{s.rows_in:>6}{s.rows_out:>6}{s.rejected:>10}"
                     f"{s.skipped:>9}{s.wall_s:>9.1f}")
    for s in summaries:
        for key, value in s.stats.items():
            lines.append(f"  {s.stage}.{key}: {value:.3f}" if isinstance(value, float)
                         else f"  {s.stage}.{key}: {value}")
    lines.append(f"total wall time: {total_s:.1f} s")
    for s in summaries:
        lines.append(f"  {s.stage}: {s.output_dir}/ (rejects in {s.output_dir}/{REJECTS}/)")
        if s.model_dir:
            lines.append(f"  {s.stage}: exported model in {s.model_dir}/")
        if s.report:
            lines.append(f"  {s.stage}: results table in {s.report} (plots and JSON beside it)")
    return "\n".join(lines)


def last_error_line(err: BaseException) -> str:
    """The last ``SomeError: message`` of an error's text (Ray's carry the remote traceback),
    with the lines of its message that follow, on one line; else its one-line description."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    starts = [i for i, ln in enumerate(lines)
              if re.match(r"^[\w.]+(Error|Exception|Failure|Unavailable|Failed)\b.*: ", ln)]
    if not starts:
        return describe(err)
    text = " ".join(ln for ln in lines[starts[-1]:] if ln)
    return text if len(text) <= 600 else text[:597] + "..."
