"""Evaluation results as tables, plots and a side-by-side comparison of runs.

The evaluate stage leaves one folder of shards per model label and benchmark,
``<output_dir>/evaluate/<model>/<benchmark>/``, one row per problem with its graded samples.
``write_results`` turns them into ``results.json``, ``results.md``, a flat ``samples.jsonl``
and two PNGs next to them; ``compare`` reads several runs' ``results.json`` and puts their
numbers side by side (the comparison arms of an experiment are separate runs).

Every sample is graded in two extraction modes (palign.method.grading): strict (the last box) and
flexible (math-verify's own extraction, as papers' labels often are). The strict figures keep
their plain names (``pass@1``, ``no_answer_share``, ...); the flexible ones sit in a
``flexible`` object with the same keys, None for rows graded before flexible grading existed.

The parts: ``scores`` (the figures of evaluation rows, on palign.method.metrics), ``results``
(one run's files and its Markdown), ``plots`` (its PNGs), ``comparison`` (several runs),
``reference`` (the paper's own figures, ``references/*.json``, shipped as package data),
``markdown`` (the table pieces they share) and ``grade_file`` (``palign grade``: a JSONL of
answers graded outside a run). ``run_report`` writes ``<output_dir>/report.html``, the page a
person reads after a run, from ``rowsample`` (the rows it shows), ``svg`` (its charts) and
``html`` (its markup).

It may import the standard library, pyarrow, matplotlib, ``palign.data``, ``palign.config``,
``palign.method`` and ``palign.common``; never an engine, a stage, Ray or a training library
(checked by ``lint-imports``, contracts in ``pyproject.toml``).
"""

from palign.report.comparison import (
    Arm,
    compare,
    format_comparison,
    load_arms,
    load_results,
    merge_arms,
)
from palign.report.markdown import MISSING
from palign.report.results import (
    EVALUATE,
    PASS_AT_1_PNG,
    PREFIX_RATIO_PNG,
    RESULTS_FORMAT,
    RESULTS_JSON,
    RESULTS_MD,
    SAMPLES_JSONL,
    TRUNCATE,
    Results,
    format_results,
    write_results,
)
from palign.report.run_report import REPORT_HTML, build_run_report, write_run_report
from palign.report.scores import (
    FLEXIBLE_PREFIX,
    HISTOGRAM_BINS,
    benchmark_metrics,
    prefix_ratio_summary,
)

__all__ = [
    "EVALUATE", "FLEXIBLE_PREFIX", "HISTOGRAM_BINS", "MISSING", "PASS_AT_1_PNG",
    "PREFIX_RATIO_PNG", "REPORT_HTML", "RESULTS_FORMAT", "RESULTS_JSON", "RESULTS_MD",
    "SAMPLES_JSONL", "TRUNCATE", "Arm", "Results", "benchmark_metrics", "build_run_report",
    "compare", "format_comparison", "format_results", "load_arms", "load_results",
    "merge_arms", "prefix_ratio_summary", "write_results", "write_run_report",
]
