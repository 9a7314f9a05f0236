"""The figures of evaluation rows: pass@k and the shares of one model on one benchmark, and the
truncate stage's prefix ratios."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from palign.method.grading import FLEXIBLE, STATUS_ERROR, STATUS_TIMEOUT
from palign.method.metrics import GradeTally
from palign.method.targets import BEGIN_DRAFT, END_DRAFT

HISTOGRAM_BINS = 10


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Where a sample keeps its flexible grade: the strict field names with this prefix.
FLEXIBLE_PREFIX = "flexible_"


def counts_correct(sample: Mapping[str, Any], prefix: str = "") -> bool:
    """Whether a sample counts as correct in one mode ("" strict, FLEXIBLE_PREFIX flexible)."""
    # A check that timed out or failed proved nothing, whatever its ``correct`` field says.
    return sample.get(prefix + "correct") is True and sample.get(prefix + "status") not in (
        STATUS_TIMEOUT, STATUS_ERROR)


def has_flexible(sample: Mapping[str, Any]) -> bool:
    # Rows written before flexible grading existed carry no flexible grade at all.
    return FLEXIBLE_PREFIX + "status" in sample


def benchmark_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics of one model on one benchmark, from the evaluate stage's rows.

    pass@k is computed for every k up to ``n``, the smallest sample count of any problem (each
    problem's estimate uses its own sample count). The top-level ``pass@k``,
    ``no_answer_share``, ``timeouts`` and ``errors`` are the strict mode's; ``flexible`` holds
    the same keys for the flexible mode, or is None when a sample has no flexible grade (rows
    from an older palign). A sample that timed out or errored counts as wrong whatever its
    ``correct`` field says. Rows without samples cannot be scored: they are counted in
    ``problems_without_samples`` and left out. Raises ValueError when no row has a sample.
    """
    tallies = {"": GradeTally(), FLEXIBLE_PREFIX: GradeTally()}
    tokens: list[int] = []
    no_end = unclosed = without_samples = 0
    flexible = True
    for row in rows:
        raw = row.get("samples")
        samples = [s for s in raw if isinstance(s, Mapping)] if isinstance(raw, list) else []
        if not samples:
            without_samples += 1
            continue
        flexible = flexible and all(has_flexible(s) for s in samples)
        for prefix, tally in tallies.items():
            tally.add((counts_correct(s, prefix), str(s.get(prefix + "status"))) for s in samples)
        for s in samples:
            output = s.get("output") if isinstance(s.get("output"), str) else ""
            if END_DRAFT not in output:
                no_end += 1
                # Opened the draft and never closed it: the student ran away inside its draft.
                if BEGIN_DRAFT in output:
                    unclosed += 1
            if _is_count(s.get("output_tokens")):
                tokens.append(s["output_tokens"])
    strict = tallies[""]
    if not strict.problems:
        raise ValueError(f"no problem has a graded sample ({without_samples} without samples)")
    counts = strict.counts()
    figures = strict.figures()
    return {
        "problems": counts["problems"],
        "samples": counts["samples"],
        "n": counts["n_min"],
        **{k: v for k, v in figures.items() if k.startswith("pass@")},
        "mean_output_tokens": sum(tokens) / len(tokens) if tokens else None,
        "no_end_of_draft_share": no_end / counts["samples"],
        "unclosed_draft_share": unclosed / counts["samples"],
        "no_answer_share": figures["no_answer_share"],
        "timeouts": figures["timeouts"],
        "errors": figures["errors"],
        "problems_without_samples": without_samples,
        FLEXIBLE: tallies[FLEXIBLE_PREFIX].figures() if flexible else None,
    }


def prefix_ratio_summary(ratios: Iterable[float],
                         sentence_ratios: Iterable[float] = ()) -> dict[str, Any] | None:
    """Count, mean, median and a 10-bin histogram over [0, 1] of the truncate stage's prefix
    ratios (the share of the CoT's characters kept), and the mean and median share of its
    sentences kept (the paper's count; None without them); None when there are none."""
    values = [min(max(float(r), 0.0), 1.0) for r in ratios]
    sentences = [min(max(float(r), 0.0), 1.0) for r in sentence_ratios]
    if not values:
        return None
    counts = [0] * HISTOGRAM_BINS
    for v in values:
        # Multiplying (not dividing by the bin width) keeps 0.3 in bin 3; 1.0 joins the top bin.
        counts[min(int(v * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "bin_edges": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
        "histogram": counts,
        "sentence_mean": statistics.fmean(sentences) if sentences else None,
        "sentence_median": statistics.median(sentences) if sentences else None,
    }


def benchmark_names(per_model: Iterable[Mapping[str, Any]]) -> list[str]:
    """Benchmark names in order of first appearance."""
    seen: dict[str, None] = {}
    for benches in per_model:
        seen.update(dict.fromkeys(benches))
    return list(seen)


def flexible_figures(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    """The flexible figures of one model and benchmark; empty when it has none (results from
    an older palign), so every flexible cell shows as missing."""
    flexible = metrics.get(FLEXIBLE)
    return flexible if isinstance(flexible, Mapping) else {}
