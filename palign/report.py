"""Evaluation results as tables, plots and a side-by-side comparison of runs.

The evaluate stage leaves one folder of shards per model label and benchmark,
``<output_dir>/evaluate/<model>/<benchmark>/``, one row per problem with its graded samples.
``write_results`` turns them into ``results.json``, ``results.md``, a flat ``samples.jsonl``
and two PNGs next to them; ``compare`` reads several runs' ``results.json`` and puts their
numbers side by side (the comparison arms of an experiment are separate runs).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.grading import STATUS_ERROR, STATUS_NO_ANSWER, STATUS_TIMEOUT
from palign.metrics import pass_at_ks
from palign.prompts import BEGIN_DRAFT, END_DRAFT
from palign.stages.io import REJECTS, read_rows, replace_atomically

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


def _counts_correct(sample: Mapping[str, Any]) -> bool:
    # A check that timed out or failed proved nothing, whatever its ``correct`` field says.
    return sample.get("correct") is True and sample.get("status") not in (STATUS_TIMEOUT,
                                                                          STATUS_ERROR)


def benchmark_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics of one model on one benchmark, from the evaluate stage's rows.

    pass@k is computed for every k up to ``n``, the smallest sample count of any problem (each
    problem's estimate uses its own sample count). A sample that timed out or errored counts as
    wrong whatever its ``correct`` field says. Rows without samples cannot be scored: they are
    counted in ``problems_without_samples`` and left out. Raises ValueError when no row has a
    sample.
    """
    correct: list[list[bool]] = []
    tokens: list[int] = []
    statuses: dict[str, int] = {}
    no_end = unclosed = without_samples = 0
    for row in rows:
        raw = row.get("samples")
        samples = [s for s in raw if isinstance(s, Mapping)] if isinstance(raw, list) else []
        if not samples:
            without_samples += 1
            continue
        marks = []
        for s in samples:
            status = str(s.get("status"))
            statuses[status] = statuses.get(status, 0) + 1
            marks.append(_counts_correct(s))
            output = s.get("output") if isinstance(s.get("output"), str) else ""
            if END_DRAFT not in output:
                no_end += 1
                # Opened the draft and never closed it: the student ran away inside its draft.
                if BEGIN_DRAFT in output:
                    unclosed += 1
            if _is_count(s.get("output_tokens")):
                tokens.append(s["output_tokens"])
        correct.append(marks)
    if not correct:
        raise ValueError(f"no problem has a graded sample ({without_samples} without samples)")
    n_samples = sum(len(c) for c in correct)
    return {
        "problems": len(correct),
        "samples": n_samples,
        "n": min(len(c) for c in correct),
        **pass_at_ks(correct),
        "mean_output_tokens": sum(tokens) / len(tokens) if tokens else None,
        "no_end_of_draft_share": no_end / n_samples,
        "unclosed_draft_share": unclosed / n_samples,
        "no_answer_share": statuses.get(STATUS_NO_ANSWER, 0) / n_samples,
        "timeouts": statuses.get(STATUS_TIMEOUT, 0),
        "errors": statuses.get(STATUS_ERROR, 0),
        "problems_without_samples": without_samples,
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


def _prefix_ratios(truncate_dir: Path) -> list[float]:
    ratios = []
    for row in read_rows(truncate_dir):
        r = row.get("prefix_ratio")
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
    results_json: Path
    results_md: Path
    samples_jsonl: Path
    pass_at_1_png: Path | None
    prefix_ratio_png: Path | None

    def to_json(self) -> dict[str, Any]:
        return {"format": RESULTS_FORMAT, "run_name": self.run_name, "models": self.metrics,
                "prefix_ratio": self.prefix_ratio}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and p.name != REJECTS and not p.name.startswith((".", "_")))


def _sample_record(row: Mapping[str, Any], model: str, benchmark: str,
                   sample: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row.get("id"), "benchmark": benchmark, "model": model,
            "sample": sample.get("sample"), "output": sample.get("output"),
            "extracted": sample.get("extracted"), "correct": _counts_correct(sample),
            "status": sample.get("status"), "output_tokens": sample.get("output_tokens"),
            "finish_reason": sample.get("finish_reason")}


def write_results(output_dir: str | Path, run_name: str | None = None) -> Results:
    """Score every ``<output_dir>/evaluate/<model>/<benchmark>/`` folder and write
    results.json, results.md, samples.jsonl, pass_at_1.png and (when the run has truncate rows)
    prefix_ratio.png into ``<output_dir>/evaluate/``. ``run_name`` defaults to the folder's name.

    The model label and benchmark come from the folder names, which is how the evaluate stage
    groups its rows. Raises FileNotFoundError without an evaluate folder and ValueError when it
    holds no scorable rows.
    """
    output_dir = Path(output_dir)
    eval_dir = output_dir / EVALUATE
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"no evaluate folder at {eval_dir}")
    name = run_name or output_dir.resolve().name
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    samples_path = eval_dir / SAMPLES_JSONL

    def write_samples(tmp: Path) -> None:
        # One benchmark folder in memory at a time; the flat records stream to disk.
        with tmp.open("w", encoding="utf-8") as f:
            for model_dir in _subdirs(eval_dir):
                for bench_dir in _subdirs(model_dir):
                    rows = list(read_rows(bench_dir))
                    model, bench = model_dir.name, bench_dir.name
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
                                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")

    replace_atomically(samples_path, write_samples)
    if not metrics:
        samples_path.unlink(missing_ok=True)
        raise ValueError(f"no scorable evaluation rows under {eval_dir}/<model>/<benchmark>/")
    prefix = prefix_ratio_summary(_prefix_ratios(output_dir / TRUNCATE))

    results = Results(
        run_name=name, metrics=metrics, prefix_ratio=prefix,
        results_json=eval_dir / RESULTS_JSON, results_md=eval_dir / RESULTS_MD,
        samples_jsonl=samples_path, pass_at_1_png=eval_dir / PASS_AT_1_PNG,
        prefix_ratio_png=eval_dir / PREFIX_RATIO_PNG if prefix else None)
    replace_atomically(results.results_json, lambda tmp: tmp.write_text(
        json.dumps(results.to_json(), indent=2) + "\n", encoding="utf-8"))
    replace_atomically(results.results_md, lambda tmp: tmp.write_text(
        format_results(results) + "\n", encoding="utf-8"))
    _plot_pass_at_1(metrics, results.pass_at_1_png, name)
    stale = eval_dir / PREFIX_RATIO_PNG
    if prefix is None:
        stale.unlink(missing_ok=True)  # an earlier run's plot would no longer match results.json
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
    """The Markdown of one run: a table per benchmark (a row per model), then the prefix ratios."""
    lines = [f"# Evaluation: {_cell(results.run_name)}"]
    for bench in _benchmarks(results.metrics.values()):
        models = [(m, b[bench]) for m, b in results.metrics.items() if bench in b]
        keys = _pass_keys(m for _, m in models)
        header = ["model", "problems", "n", *keys, "mean output tokens",
                  "no `<End_of_Draft>`", "no answer", "timeouts"]
        rows = [[_cell(model), str(m["problems"]), str(m["n"]),
                 *[_num(m.get(k), ".4f") for k in keys],
                 _num(m["mean_output_tokens"], ".1f"), f"{m['no_end_of_draft_share']:.1%}",
                 f"{m['no_answer_share']:.1%}", str(m["timeouts"])] for model, m in models]
        lines += ["", f"## {_cell(bench)}", "", *_table(header, rows)]
    if results.prefix_ratio:
        lines += ["", *_prefix_lines(results.prefix_ratio)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _save_figure(fig: Any, path: Path) -> None:
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _plot_pass_at_1(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path,
                    title: str) -> None:
    # A bare Figure draws with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    benches = _benchmarks(metrics.values())
    models = list(metrics)
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(4.0, 1.3 * len(benches) + 2.0), 3.6))
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(benches))]
        ys = [metrics[model].get(b, {}).get("pass@1", math.nan) for b in benches]
        bars = ax.bar(xs, ys, width=width, label=model)
        ax.bar_label(bars, labels=["" if math.isnan(y) else f"{y:.2f}" for y in ys],
                     fontsize="small")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@1")
    ax.set_title(f"{title}: pass@1 per benchmark")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_prefix_ratio(prefix: Mapping[str, Any], path: Path, title: str) -> None:
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
    """A table per benchmark with a row per (arm, model), then each arm's mean prefix ratio."""
    lines = ["# Comparison: " + ", ".join(_cell(a.name) for a in arms)]
    for bench in _benchmarks(b for a in arms for b in a.results["models"].values()):
        rows = []
        for arm in arms:
            for model, benches in arm.results["models"].items():
                m = benches.get(bench)
                if m is None:
                    continue
                rows.append([_cell(arm.name), _cell(model), str(m["n"]),
                             _num(m.get("pass@1"), ".4f"), _num(m.get(f"pass@{m['n']}"), ".4f"),
                             _num(m.get("mean_output_tokens"), ".1f"),
                             _num(m.get("no_end_of_draft_share"), ".1%"),
                             _num(m.get("no_answer_share"), ".1%")])
        header = ["arm", "model", "n", "pass@1", "pass@n", "mean output tokens",
                  "no `<End_of_Draft>`", "no answer"]
        lines += ["", f"## {_cell(bench)}", "", *_table(header, rows)]
    with_prefix = [a for a in arms if isinstance(a.results.get("prefix_ratio"), dict)]
    if with_prefix:
        rows = [[_cell(a.name), str(a.results["prefix_ratio"].get("count", MISSING)),
                 _num(a.results["prefix_ratio"].get("mean"), ".3f")] for a in with_prefix]
        lines += ["", "## Prefix ratio (truncate stage)", "",
                  *_table(["arm", "rows", "mean prefix ratio"], rows)]
    return "\n".join(lines)


def merge_arms(arms: list[Arm]) -> dict[str, Any]:
    """A machine-readable merge: each arm's results, and a flat row per (arm, model, benchmark)
    that loads straight into a data frame."""
    rows = [{"arm": a.name, "model": model, "benchmark": bench, **m}
            for a in arms for model, benches in a.results["models"].items()
            for bench, m in benches.items()]
    return {"arms": [{"name": a.name, "source": str(a.source), **a.results} for a in arms],
            "rows": rows}


def compare(paths: list[str]) -> str:
    """The comparison table of the runs at ``paths`` (output_dirs, evaluate/ folders or
    results.json files). Raises ValueError naming a path that is missing or broken."""
    return format_comparison(load_arms(paths))
