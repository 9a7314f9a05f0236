"""Evaluation results as tables, plots and a side-by-side comparison of runs.

The evaluate stage leaves one folder of shards per model label and benchmark,
``<output_dir>/evaluate/<model>/<benchmark>/``, one row per problem with its graded samples.
``write_results`` turns them into ``results.json``, ``results.md``, a flat ``samples.jsonl``
and two PNGs next to them; ``compare`` reads several runs' ``results.json`` and puts their
numbers side by side (the comparison arms of an experiment are separate runs).

Every sample is graded in two extraction modes (palign.core.grading): strict (the last box) and
flexible (math-verify's own extraction, as papers' labels often are). The strict figures keep
their plain names (``pass@1``, ``no_answer_share``, ...); the flexible ones sit in a
``flexible`` object with the same keys, None for rows graded before flexible grading existed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.core import storage
from palign.core.grading import FLEXIBLE, STATUS_ERROR, STATUS_TIMEOUT
from palign.core.metrics import grade_figures
from palign.core.prompts import BEGIN_DRAFT, END_DRAFT
from palign.core.shards import REJECTS, read_index, read_rows

log = logging.getLogger(__name__)

EVALUATE = "evaluate"
TRUNCATE = "truncate"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SAMPLES_JSONL = "samples.jsonl"
PASS_AT_1_PNG = "pass_at_1.png"
PREFIX_RATIO_PNG = "prefix_ratio.png"
RESULTS_FORMAT = "palign.results/1"
HISTOGRAM_BINS = 10

# The Markdown cell for a number that does not exist (a k beyond a model's n, no token counts).
MISSING = "-"


# --------------------------------------------------------------------------- metrics


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Where a sample keeps its flexible grade: the strict field names with this prefix.
FLEXIBLE_PREFIX = "flexible_"


def _counts_correct(sample: Mapping[str, Any], prefix: str = "") -> bool:
    """Whether a sample counts as correct in one mode ("" strict, FLEXIBLE_PREFIX flexible)."""
    # A check that timed out or failed proved nothing, whatever its ``correct`` field says.
    return sample.get(prefix + "correct") is True and sample.get(prefix + "status") not in (
        STATUS_TIMEOUT, STATUS_ERROR)


def _has_flexible(sample: Mapping[str, Any]) -> bool:
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
    correct: dict[str, list[list[bool]]] = {"": [], FLEXIBLE_PREFIX: []}
    statuses: dict[str, dict[str, int]] = {"": {}, FLEXIBLE_PREFIX: {}}
    tokens: list[int] = []
    no_end = unclosed = without_samples = 0
    flexible = True
    for row in rows:
        raw = row.get("samples")
        samples = [s for s in raw if isinstance(s, Mapping)] if isinstance(raw, list) else []
        if not samples:
            without_samples += 1
            continue
        flexible = flexible and all(_has_flexible(s) for s in samples)
        for prefix, marks in correct.items():
            marks.append([_counts_correct(s, prefix) for s in samples])
            for s in samples:
                status = str(s.get(prefix + "status"))
                statuses[prefix][status] = statuses[prefix].get(status, 0) + 1
        for s in samples:
            output = s.get("output") if isinstance(s.get("output"), str) else ""
            if END_DRAFT not in output:
                no_end += 1
                # Opened the draft and never closed it: the student ran away inside its draft.
                if BEGIN_DRAFT in output:
                    unclosed += 1
            if _is_count(s.get("output_tokens")):
                tokens.append(s["output_tokens"])
    strict = correct[""]
    if not strict:
        raise ValueError(f"no problem has a graded sample ({without_samples} without samples)")
    n_samples = sum(len(c) for c in strict)
    figures = grade_figures(strict, statuses[""])
    return {
        "problems": len(strict),
        "samples": n_samples,
        "n": min(len(c) for c in strict),
        **{k: v for k, v in figures.items() if k.startswith("pass@")},
        "mean_output_tokens": sum(tokens) / len(tokens) if tokens else None,
        "no_end_of_draft_share": no_end / n_samples,
        "unclosed_draft_share": unclosed / n_samples,
        "no_answer_share": figures["no_answer_share"],
        "timeouts": figures["timeouts"],
        "errors": figures["errors"],
        "problems_without_samples": without_samples,
        FLEXIBLE: (grade_figures(correct[FLEXIBLE_PREFIX], statuses[FLEXIBLE_PREFIX])
                   if flexible else None),
    }


def prefix_ratio_summary(ratios: Iterable[float]) -> dict[str, Any] | None:
    """Count, mean, median and a 10-bin histogram over [0, 1] of the truncate stage's prefix
    ratios; None when there are none."""
    values = [min(max(float(r), 0.0), 1.0) for r in ratios]
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
    }


def _prefix_ratios(truncate_dir: str | Path) -> list[float]:
    """The truncate stage's prefix ratios, from its index (no CoT is read)."""
    ratios = []
    for r in read_index(truncate_dir, ("prefix_ratio",))["prefix_ratio"].to_pylist():
        if isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r):
            ratios.append(float(r))
    return ratios


# --------------------------------------------------------------------------- one run


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

    def to_json(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, "run_name": self.run_name, "models": self.metrics,
                "prefix_ratio": self.prefix_ratio}


def _subdirs(folder: str) -> list[str]:
    return [n for n in storage.list_dirs(folder)
            if n != REJECTS and not n.startswith((".", "_"))]


def _at(folder: str | Path, name: str) -> Path | str:
    """``folder/name``: a Path on local disk, a URI's text on object storage."""
    return storage.join(folder, name) if storage.is_uri(folder) else Path(folder) / name


def _sample_record(row: Mapping[str, Any], model: str, benchmark: str,
                   sample: Mapping[str, Any]) -> dict[str, Any]:
    flexible = _has_flexible(sample)
    return {"id": row.get("id"), "benchmark": benchmark, "model": model,
            "sample": sample.get("sample"), "output": sample.get("output"),
            "extracted": sample.get("extracted"), "correct": _counts_correct(sample),
            "status": sample.get("status"),
            "flexible_extracted": sample.get(FLEXIBLE_PREFIX + "extracted"),
            "flexible_correct": _counts_correct(sample, FLEXIBLE_PREFIX) if flexible else None,
            "flexible_status": sample.get(FLEXIBLE_PREFIX + "status"),
            "output_tokens": sample.get("output_tokens"),
            "finish_reason": sample.get("finish_reason")}


def write_results(output_dir: str | Path, run_name: str | None = None) -> Results:
    """Score every ``<output_dir>/evaluate/<model>/<benchmark>/`` folder and write
    results.json, results.md, samples.jsonl, pass_at_1.png and (when the run has truncate rows)
    prefix_ratio.png into ``<output_dir>/evaluate/``. ``run_name`` defaults to the folder's name.

    The model label and benchmark come from the folder names, which is how the evaluate stage
    groups its rows. Raises FileNotFoundError without an evaluate folder and ValueError when it
    holds no scorable rows.
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
    for model in _subdirs(eval_dir):
        for bench in _subdirs(storage.join(eval_dir, model)):
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
    prefix = prefix_ratio_summary(_prefix_ratios(storage.join(output_dir, TRUNCATE)))

    results = Results(
        run_name=name, metrics=metrics, prefix_ratio=prefix,
        results_json=_at(eval_dir, RESULTS_JSON), results_md=_at(eval_dir, RESULTS_MD),
        samples_jsonl=samples_path, pass_at_1_png=_at(eval_dir, PASS_AT_1_PNG),
        prefix_ratio_png=_at(eval_dir, PREFIX_RATIO_PNG) if prefix else None)
    storage.write_text(results.results_json, json.dumps(results.to_json(), indent=2) + "\n")
    storage.write_text(results.results_md, format_results(results) + "\n")
    _plot_pass_at_1(metrics, results.pass_at_1_png, name)
    stale = _at(eval_dir, PREFIX_RATIO_PNG)
    if prefix is None:
        storage.delete(stale)  # an earlier run's plot would no longer match results.json
    else:
        _plot_prefix_ratio(prefix, stale, name)
    log.info("evaluation results for %d model(s) written to %s", len(metrics), eval_dir)
    return results


# --------------------------------------------------------------------------- Markdown


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _num(value: Any, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _benchmarks(per_model: Iterable[Mapping[str, Any]]) -> list[str]:
    """Benchmark names in order of first appearance."""
    seen: dict[str, None] = {}
    for benches in per_model:
        seen.update(dict.fromkeys(benches))
    return list(seen)


def _flexible(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    """The flexible figures of one model and benchmark; empty when it has none (results from
    an older palign), so every flexible cell shows as missing."""
    flexible = metrics.get(FLEXIBLE)
    return flexible if isinstance(flexible, Mapping) else {}


def _pass_keys(metric_dicts: Iterable[Mapping[str, Any]]) -> list[str]:
    ks = {int(k.split("@")[1]) for m in metric_dicts for k in m if k.startswith("pass@")}
    return [f"pass@{k}" for k in sorted(ks)]


def _prefix_lines(prefix: Mapping[str, Any]) -> list[str]:
    edges, counts = prefix["bin_edges"], prefix["histogram"]
    lines = ["## Prefix ratio (truncate stage)", "",
             f"{prefix['count']} rows, mean {prefix['mean']:.3f}, "
             f"median {prefix['median']:.3f}", ""]
    return lines + _table(["prefix ratio", "rows"], [
        [f"{edges[i]:.1f}-{edges[i + 1]:.1f}", str(c)] for i, c in enumerate(counts)])


def format_results(results: Results) -> str:
    """The Markdown of one run: a table per benchmark (a row per model; the strict pass@k, then
    the flexible ones), then the prefix ratios."""
    lines = [f"# Evaluation: {_cell(results.run_name)}",
             "", "pass@k: strict extraction (the last `\\boxed{}`); flexible pass@k: "
             "math-verify's own extraction over the whole output (docs/evaluation.md)."]
    for bench in _benchmarks(results.metrics.values()):
        models = [(m, b[bench]) for m, b in results.metrics.items() if bench in b]
        keys = _pass_keys(m for _, m in models)
        header = ["model", "problems", "n", *keys, *[f"flexible {k}" for k in keys],
                  "mean output tokens", "no `<End_of_Draft>`", "no answer",
                  "flexible no answer", "timeouts", "flexible timeouts"]
        rows = [[_cell(model), str(m["problems"]), str(m["n"]),
                 *[_num(m.get(k), ".4f") for k in keys],
                 *[_num(_flexible(m).get(k), ".4f") for k in keys],
                 _num(m["mean_output_tokens"], ".1f"), f"{m['no_end_of_draft_share']:.1%}",
                 f"{m['no_answer_share']:.1%}", _num(_flexible(m).get("no_answer_share"), ".1%"),
                 str(m["timeouts"]), _num(_flexible(m).get("timeouts"), "d")]
                for model, m in models]
        lines += ["", f"## {_cell(bench)}", "", *_table(header, rows)]
    if results.prefix_ratio:
        lines += ["", *_prefix_lines(results.prefix_ratio)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _save_figure(fig: Any, path: Path | str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    storage.write_bytes(path, buf.getvalue())


def _plot_pass_at_1(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path | str,
                    title: str) -> None:
    """Bars of pass@1 per benchmark: for each model a solid strict bar and, beside it, a hatched
    flexible bar in the same colour (absent where there is no flexible figure)."""
    # A bare Figure draws with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    benches = _benchmarks(metrics.values())
    models = list(metrics)
    bars_per_bench = 2 * len(models)
    width = 0.8 / bars_per_bench
    fig = Figure(figsize=(max(4.0, 2.0 * len(benches) + 2.0), 3.6))
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        per_bench = [metrics[model].get(b, {}) for b in benches]
        strict = [m.get("pass@1", math.nan) for m in per_bench]
        flexible = [_flexible(m).get("pass@1", math.nan) for m in per_bench]
        color = f"C{i % 10}"
        for j, (ys, label, hatch) in enumerate(((strict, f"{model} (strict)", None),
                                                (flexible, f"{model} (flexible)", "//"))):
            slot = 2 * i + j
            xs = [b + (slot - (bars_per_bench - 1) / 2) * width for b in range(len(benches))]
            bars = ax.bar(xs, ys, width=width, label=label, color=color, hatch=hatch,
                          alpha=0.55 if hatch else 1.0, edgecolor=color)
            ax.bar_label(bars, labels=["" if math.isnan(y) else f"{y:.2f}" for y in ys],
                         fontsize="x-small")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@1")
    ax.set_title(f"{title}: pass@1 per benchmark (strict and flexible extraction)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_prefix_ratio(prefix: Mapping[str, Any], path: Path | str, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    edges, counts = prefix["bin_edges"], prefix["histogram"]
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    # Bars from the stored counts, so the plot and results.json cannot disagree.
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
           edgecolor="black")
    ax.axvline(prefix["mean"], color="black", linestyle="--", label=f"mean {prefix['mean']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("prefix ratio (share of the CoT kept)")
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}: prefix ratios ({prefix['count']} rows)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)


# --------------------------------------------------------------------------- comparison


@dataclass
class Arm:
    """One run's results.json, named for the comparison."""

    name: str
    source: Path
    results: dict[str, Any]


def _results_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for candidate in (p / RESULTS_JSON, p / EVALUATE / RESULTS_JSON):
            if candidate.is_file():
                return candidate
        raise ValueError(f"{path}: no {RESULTS_JSON} in it or in its {EVALUATE}/ folder")
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    return p


def _check_results(data: Any, source: Path) -> dict[str, Any]:
    """The shape compare relies on; anything else is named as not a results file."""
    models = data.get("models") if isinstance(data, dict) else None
    ok = isinstance(models, dict) and models and all(
        isinstance(benches, dict) and all(
            isinstance(m, dict) and isinstance(m.get("n"), int) and "pass@1" in m
            for m in benches.values())
        for benches in models.values())
    if not ok:
        raise ValueError(f"{source}: not a palign {RESULTS_JSON} (needs models -> benchmark -> "
                         "metrics with n and pass@1)")
    return data


def load_results(path: str) -> tuple[Path, dict[str, Any]]:
    """Read the results.json that ``path`` (a run's output_dir, its evaluate/ folder or the file
    itself) points to. Raises ValueError naming the path when it is missing or broken."""
    source = _results_file(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: cannot read it: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON: {err}") from err
    return source, _check_results(data, source)


def load_arms(paths: list[str]) -> list[Arm]:
    """One Arm per path, named by its run name; runs that share a name get their path added."""
    if not paths:
        raise ValueError("compare needs at least one results path")
    loaded = []
    for path in paths:
        source, data = load_results(path)
        run = data.get("run_name")
        if not isinstance(run, str) or not run:
            # Fall back on the run's folder: <output_dir>/evaluate/results.json.
            run = source.resolve().parent.parent.name
        loaded.append((run, path, source, data))
    names = [run for run, _, _, _ in loaded]
    return [Arm(name=run if names.count(run) == 1 else f"{run} ({path})", source=source,
                results=data) for run, path, source, data in loaded]


def format_comparison(arms: list[Arm]) -> str:
    """A table per benchmark with a row per (arm, model), strict and flexible figures side by
    side (flexible ones missing for results from an older palign), then each arm's mean prefix
    ratio."""
    lines = ["# Comparison: " + ", ".join(_cell(a.name) for a in arms)]
    for bench in _benchmarks(b for a in arms for b in a.results["models"].values()):
        rows = []
        for arm in arms:
            for model, benches in arm.results["models"].items():
                m = benches.get(bench)
                if m is None:
                    continue
                flexible = _flexible(m)
                rows.append([_cell(arm.name), _cell(model), str(m["n"]),
                             _num(m.get("pass@1"), ".4f"), _num(m.get(f"pass@{m['n']}"), ".4f"),
                             _num(flexible.get("pass@1"), ".4f"),
                             _num(flexible.get(f"pass@{m['n']}"), ".4f"),
                             _num(m.get("mean_output_tokens"), ".1f"),
                             _num(m.get("no_end_of_draft_share"), ".1%"),
                             _num(m.get("no_answer_share"), ".1%"),
                             _num(flexible.get("no_answer_share"), ".1%")])
        header = ["arm", "model", "n", "pass@1", "pass@n", "flexible pass@1", "flexible pass@n",
                  "mean output tokens", "no `<End_of_Draft>`", "no answer", "flexible no answer"]
        lines += ["", f"## {_cell(bench)}", "", *_table(header, rows)]
    with_prefix = [a for a in arms if isinstance(a.results.get("prefix_ratio"), dict)]
    if with_prefix:
        rows = [[_cell(a.name), str(a.results["prefix_ratio"].get("count", MISSING)),
                 _num(a.results["prefix_ratio"].get("mean"), ".3f")] for a in with_prefix]
        lines += ["", "## Prefix ratio (truncate stage)", "",
                  *_table(["arm", "rows", "mean prefix ratio"], rows)]
    return "\n".join(lines)


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One model's metrics with the flexible object spread into ``flexible_<key>`` columns."""
    flat = {k: v for k, v in metrics.items() if k != FLEXIBLE}
    flat.update({f"{FLEXIBLE_PREFIX}{k}": v for k, v in _flexible(metrics).items()})
    return flat


def merge_arms(arms: list[Arm]) -> dict[str, Any]:
    """A machine-readable merge: each arm's results as they are, and a flat row per (arm, model,
    benchmark) that loads straight into a data frame (the flexible figures as
    ``flexible_pass@1``, ``flexible_no_answer_share``, ...)."""
    rows = [{"arm": a.name, "model": model, "benchmark": bench, **_flat_metrics(m)}
            for a in arms for model, benches in a.results["models"].items()
            for bench, m in benches.items()]
    return {"arms": [{"name": a.name, "source": str(a.source), **a.results} for a in arms],
            "rows": rows}


def compare(paths: list[str]) -> str:
    """The comparison table of the runs at ``paths`` (output_dirs, evaluate/ folders or
    results.json files). Raises ValueError naming a path that is missing or broken."""
    return format_comparison(load_arms(paths))
