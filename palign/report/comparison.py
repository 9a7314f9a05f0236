"""Several runs side by side: their results.json files, as tables or one merged JSON (the
comparison arms of an experiment are separate runs)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.method.grading import FLEXIBLE
from palign.report.markdown import MISSING, cell, num, table
from palign.report.results import EVALUATE, RESULTS_JSON
from palign.report.scores import FLEXIBLE_PREFIX, benchmark_names, flexible_figures


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
    lines = ["# Comparison: " + ", ".join(cell(a.name) for a in arms)]
    for bench in benchmark_names(b for a in arms for b in a.results["models"].values()):
        rows = []
        for arm in arms:
            for model, benches in arm.results["models"].items():
                m = benches.get(bench)
                if m is None:
                    continue
                flexible = flexible_figures(m)
                rows.append([cell(arm.name), cell(model), str(m["n"]),
                             num(m.get("pass@1"), ".4f"), num(m.get(f"pass@{m['n']}"), ".4f"),
                             num(flexible.get("pass@1"), ".4f"),
                             num(flexible.get(f"pass@{m['n']}"), ".4f"),
                             num(m.get("mean_output_tokens"), ".1f"),
                             num(m.get("no_end_of_draft_share"), ".1%"),
                             num(m.get("no_answer_share"), ".1%"),
                             num(flexible.get("no_answer_share"), ".1%")])
        header = ["arm", "model", "n", "pass@1", "pass@n", "flexible pass@1", "flexible pass@n",
                  "mean output tokens", "no `<End_of_Draft>`", "no answer", "flexible no answer"]
        lines += ["", f"## {cell(bench)}", "", *table(header, rows)]
    with_prefix = [a for a in arms if isinstance(a.results.get("prefix_ratio"), dict)]
    if with_prefix:
        rows = [[cell(a.name), str(a.results["prefix_ratio"].get("count", MISSING)),
                 num(a.results["prefix_ratio"].get("mean"), ".3f"),
                 num(a.results["prefix_ratio"].get("sentence_mean"), ".3f")]
                for a in with_prefix]
        lines += ["", "## Prefix ratio (truncate stage)", "",
                  *table(["arm", "rows", "mean prefix ratio (characters)",
                          "mean prefix ratio (sentences)"], rows)]
    return "\n".join(lines)


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One model's metrics with the flexible object spread into ``flexible_<key>`` columns."""
    flat = {k: v for k, v in metrics.items() if k != FLEXIBLE}
    flat.update({f"{FLEXIBLE_PREFIX}{k}": v for k, v in flexible_figures(metrics).items()})
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
