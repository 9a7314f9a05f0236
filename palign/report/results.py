"""One run's results: score its evaluate folders and write results.json, results.md,
samples.jsonl and the plots next to them."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.data import storage
from palign.data.digest import count_rows, read_index
from palign.data.layout import REJECTS
from palign.data.shards import read_rows
from palign.report.markdown import cell, num, pass_keys, table
from palign.report.plots import plot_pass_at_1, plot_prefix_ratio
from palign.report.scores import (
    FLEXIBLE_PREFIX,
    benchmark_metrics,
    benchmark_names,
    counts_correct,
    flexible_figures,
    has_flexible,
    prefix_ratio_summary,
)

log = logging.getLogger(__name__)

EVALUATE = "evaluate"
TRUNCATE = "truncate"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SAMPLES_JSONL = "samples.jsonl"
PASS_AT_1_PNG = "pass_at_1.png"
PREFIX_RATIO_PNG = "prefix_ratio.png"
RESULTS_FORMAT = "palign.results/1"


@dataclass
class Results:
    """What ``write_results`` computed and where it put it. ``metrics`` maps model label ->
    benchmark -> ``benchmark_metrics``; a PNG path is None when that plot was not drawn."""

    run_name: str
    metrics: dict[str, dict[str, dict[str, Any]]]
    prefix_ratio: dict[str, Any] | None
    results_json: Path | str  # a Path for a local run folder, a URI's text for object storage
    results_md: Path | str
    samples_jsonl: Path | str
    pass_at_1_png: Path | str | None
    prefix_ratio_png: Path | str | None

    data: dict[str, Any] | None = None  # the rows the run's align kept and train used

    def to_json(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, "run_name": self.run_name, "models": self.metrics,
                "prefix_ratio": self.prefix_ratio, "data": self.data}


def _subdirs(folder: str) -> list[str]:
    return [n for n in storage.list_dirs(folder)
            if n != REJECTS and not n.startswith((".", "_"))]


def _at(folder: str | Path, name: str) -> Path | str:
    """``folder/name``: a Path on local disk, a URI's text on object storage."""
    return storage.join(folder, name) if storage.is_uri(folder) else Path(folder) / name


def _sample_record(row: Mapping[str, Any], model: str, benchmark: str,
                   sample: Mapping[str, Any]) -> dict[str, Any]:
    flexible = has_flexible(sample)
    return {"id": row.get("id"), "benchmark": benchmark, "model": model,
            "sample": sample.get("sample"), "output": sample.get("output"),
            "extracted": sample.get("extracted"), "correct": counts_correct(sample),
            "status": sample.get("status"),
            "flexible_extracted": sample.get(FLEXIBLE_PREFIX + "extracted"),
            "flexible_correct": counts_correct(sample, FLEXIBLE_PREFIX) if flexible else None,
            "flexible_status": sample.get(FLEXIBLE_PREFIX + "status"),
            "output_tokens": sample.get("output_tokens"),
            "finish_reason": sample.get("finish_reason")}


def write_results(output_dir: str | Path, run_name: str | None = None,
                  pairs: Sequence[tuple[str, str]] | None = None) -> Results:
    """Score every ``<output_dir>/evaluate/<model>/<benchmark>/`` folder and write
    results.json, results.md, samples.jsonl, pass_at_1.png and (when the run has truncate rows)
    prefix_ratio.png into ``<output_dir>/evaluate/``. ``run_name`` defaults to the folder's name.

    The model label and benchmark come from the folder names, which is how the evaluate stage
    groups its rows. ``pairs`` (model label, benchmark) limits the scoring to those folders
    (the evaluate stage passes its config's, so that folders an earlier config left are never
    scored with this one's). Raises FileNotFoundError without an evaluate folder and
    ValueError when it holds no scorable rows.
    """
    output_dir = storage.absolute(output_dir)
    eval_dir = storage.join(output_dir, EVALUATE)
    if not storage.is_dir(eval_dir):
        raise FileNotFoundError(f"no evaluate folder at {eval_dir}")
    name = run_name or storage.name(output_dir)
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    samples_path = _at(eval_dir, SAMPLES_JSONL)
    # One benchmark folder in memory at a time; the flat records go into one buffer, written
    # whole at the end.
    samples = io.StringIO()
    if pairs is None:
        pairs = [(model, bench) for model in _subdirs(eval_dir)
                 for bench in _subdirs(storage.join(eval_dir, model))]
    for model, bench in pairs:
        bench_dir = storage.join(eval_dir, model, bench)
        rows = list(read_rows(bench_dir))
        try:
            scored = benchmark_metrics(rows)
        except ValueError as err:
            log.warning("%s: not scored: %s", bench_dir, err)
            continue
        metrics.setdefault(model, {})[bench] = scored
        for row in rows:
            for s in row.get("samples") or []:
                if isinstance(s, Mapping):
                    rec = _sample_record(row, model, bench, s)
                    samples.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    if not metrics:
        storage.delete(samples_path)
        raise ValueError(f"no scorable evaluation rows under {eval_dir}/<model>/<benchmark>/")
    storage.write_text(samples_path, samples.getvalue())
    prefix = prefix_ratio_summary(*_prefix_ratios(storage.join(output_dir, TRUNCATE)))

    results = Results(
        run_name=name, metrics=metrics, prefix_ratio=prefix, data=_data_counts(output_dir),
        results_json=_at(eval_dir, RESULTS_JSON), results_md=_at(eval_dir, RESULTS_MD),
        samples_jsonl=samples_path, pass_at_1_png=_at(eval_dir, PASS_AT_1_PNG),
        prefix_ratio_png=_at(eval_dir, PREFIX_RATIO_PNG) if prefix else None)
    storage.write_text(results.results_json, json.dumps(results.to_json(), indent=2) + "\n")
    storage.write_text(results.results_md, format_results(results) + "\n")
    plot_pass_at_1(metrics, results.pass_at_1_png, name)
    stale = _at(eval_dir, PREFIX_RATIO_PNG)
    if prefix is None:
        storage.delete(stale)  # an earlier run's plot would no longer match results.json
    else:
        plot_prefix_ratio(prefix, stale, name)
    log.info("evaluation results for %d model(s) written to %s", len(metrics), eval_dir)
    return results


def _data_counts(output_dir: str) -> dict[str, Any]:
    """The rows this run's align stage kept and its train stage trained on (from the align
    index and train/summary.json; None where the run has no such stage)."""
    align = storage.join(output_dir, "align")
    summary = storage.join(output_dir, "train", "summary.json")
    train_rows = None
    if storage.is_file(summary):
        train_rows = json.loads(storage.read_text(summary)).get("rows_used")
    return {"align_rows": count_rows(align) if storage.is_dir(align) else None,
            "train_rows": train_rows}


def _finite(values: list[Any]) -> list[float]:
    return [float(r) for r in values if isinstance(r, (int, float)) and not isinstance(r, bool)
            and math.isfinite(r)]


def _prefix_ratios(truncate_dir: str | Path) -> tuple[list[float], list[float]]:
    """The truncate stage's prefix ratios in characters and in sentences (the share of the
    CoT's sentences kept, as the paper counts), from its index (no CoT is read)."""
    index = read_index(truncate_dir, ("prefix_ratio", "sentence_ratio"))  # absent: null
    return (_finite(index["prefix_ratio"].to_pylist()),
            _finite(index["sentence_ratio"].to_pylist()))


# -- results.md


def _prefix_lines(prefix: Mapping[str, Any]) -> list[str]:
    edges, counts = prefix["bin_edges"], prefix["histogram"]
    lines = ["## Prefix ratio (truncate stage)", "",
             f"{prefix['count']} rows; share of the CoT's characters kept: mean "
             f"{prefix['mean']:.3f}, median {prefix['median']:.3f}; share of its sentences "
             f"kept: mean {num(prefix.get('sentence_mean'), '.3f')}, median "
             f"{num(prefix.get('sentence_median'), '.3f')}", ""]
    return lines + table(["prefix ratio", "rows"], [
        [f"{edges[i]:.1f}-{edges[i + 1]:.1f}", str(c)] for i, c in enumerate(counts)])


def format_results(results: Results) -> str:
    """The Markdown of one run: a table per benchmark (a row per model; the strict pass@k, then
    the flexible ones), then the prefix ratios."""
    lines = [f"# Evaluation: {cell(results.run_name)}",
             "", "pass@k: strict extraction (the last `\\boxed{}`); flexible pass@k: "
             "math-verify's own extraction over the whole output (docs/evaluation.md)."]
    for bench in benchmark_names(results.metrics.values()):
        models = [(m, b[bench]) for m, b in results.metrics.items() if bench in b]
        keys = pass_keys(m for _, m in models)
        header = ["model", "problems", "n", *keys, *[f"flexible {k}" for k in keys],
                  "mean output tokens", "no `<End_of_Draft>`", "no answer",
                  "flexible no answer", "timeouts", "flexible timeouts"]
        rows = []
        for model, m in models:
            flexible = flexible_figures(m)
            rows.append([cell(model), str(m["problems"]), str(m["n"]),
                         *[num(m.get(k), ".4f") for k in keys],
                         *[num(flexible.get(k), ".4f") for k in keys],
                         num(m["mean_output_tokens"], ".1f"), f"{m['no_end_of_draft_share']:.1%}",
                         f"{m['no_answer_share']:.1%}", num(flexible.get("no_answer_share"), ".1%"),
                         str(m["timeouts"]), num(flexible.get("timeouts"), "d")])
        lines += ["", f"## {cell(bench)}", "", *table(header, rows)]
    if results.prefix_ratio:
        lines += ["", *_prefix_lines(results.prefix_ratio)]
    return "\n".join(lines)
