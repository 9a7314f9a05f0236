"""Published numbers to compare runs against (``palign compare RUN... --reference paper``).

A reference is a JSON file: its rows name the arm (a run's ``run.name``, as the presets in
``configs/paper/`` name them), the student, a label, where every number comes from
(``source``, ``verified_against_paper``) and pass@1 / pass@3 per benchmark (fractions, keyed by
the presets' benchmark names); ``figure`` says which of palign's figures the numbers are
comparable with (``flexible``: math-verify over the whole output); ``not_found`` lists what
could not be found. ``paper`` is the P-ALIGN paper's, shipped in ``references/paper.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palign.data import storage
from palign.report.comparison import Arm
from palign.report.markdown import cell, num, table
from palign.report.plots import save_figure
from palign.report.scores import benchmark_names, flexible_figures

REFERENCES = Path(__file__).resolve().parent / "references"
KEYS = ("pass@1", "pass@3")


def load_reference(name: str) -> dict[str, Any]:
    """A shipped reference by name (``paper``) or a reference JSON file's path. Raises
    ValueError naming what is wrong."""
    path = REFERENCES / f"{name}.json"
    text: str
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif storage.is_file(name):
        text = storage.read_text(name)
    else:
        known = ", ".join(sorted(p.stem for p in REFERENCES.glob("*.json")))
        raise ValueError(f"--reference {name}: neither a shipped reference ({known}) nor a file")
    try:
        ref = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reference {name}: not valid JSON: {err}") from err
    if not isinstance(ref, dict) or not isinstance(ref.get("rows"), list):
        raise ValueError(f"--reference {name}: needs a list of rows")
    return ref


def _ours(metrics: dict[str, Any], figure: str, key: str) -> float | None:
    """Our figure comparable with the reference's ``key`` (pass@3 is our pass@n at n = 3)."""
    source = flexible_figures(metrics) if figure == "flexible" else metrics
    if key == "pass@3" and metrics.get("n") != 3:
        return None
    value = source.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def reference_rows(arms: list[Arm], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (arm, model under test, benchmark, reference row of that arm), with ours,
    theirs and the difference for pass@1 and pass@3."""
    figure = ref.get("figure", "flexible")
    out = []
    for arm in arms:
        run = arm.results.get("run_name") or arm.name
        theirs = [r for r in ref["rows"] if r.get("arm") == run]
        for model, benches in arm.results["models"].items():
            for bench, metrics in benches.items():
                for r in theirs:
                    paper = r.get("benchmarks", {}).get(bench)
                    if paper is None:
                        continue
                    row: dict[str, Any] = {"arm": arm.name, "model": model, "benchmark": bench,
                                           "reference": r.get("label", ""),
                                           "source": r.get("source", "")}
                    for key in KEYS:
                        ours, them = _ours(metrics, figure, key), paper.get(key)
                        row[f"ours_{key}"], row[f"paper_{key}"] = ours, them
                        row[f"diff_{key}"] = (ours - them if ours is not None
                                              and them is not None else None)
                    out.append(row)
    return out


def format_reference(arms: list[Arm], ref: dict[str, Any]) -> str:
    """The arms' numbers beside the reference's, per benchmark, with the differences, the rows
    each arm trained on, and where each reference number comes from."""
    rows = reference_rows(arms, ref)
    figure = ref.get("figure", "flexible")
    lines = [f"# Against {ref.get('name', 'the reference')}", "",
             f"Ours: palign's {figure} figures. {ref.get('figure_note', '')}".strip(),
             f"Protocol: {ref['protocol']}" if ref.get("protocol") else ""]
    for bench in benchmark_names([{r["benchmark"]: None for r in rows}]):
        body = [[cell(r["arm"]), cell(r["model"]), cell(r["reference"]),
                 *[num(r[f"{side}_{k}"], ".4f") for k in KEYS for side in ("ours", "paper")],
                 *[num(r[f"diff_{k}"], "+.4f") for k in KEYS]]
                for r in rows if r["benchmark"] == bench]
        header = ["arm", "model", "reference", "ours pass@1", "paper pass@1", "ours pass@3",
                  "paper pass@3", "diff pass@1", "diff pass@3"]
        lines += ["", f"## {cell(bench)}", "", *table(header, body)]
    unmatched = sorted({a.name for a in arms} - {r["arm"] for r in rows})
    if unmatched:
        lines += ["", "No reference numbers for: " + ", ".join(unmatched)
                  + " (the reference has none for these arms or benchmarks)"]
    data_rows = [[cell(a.name), num((a.results.get("data") or {}).get("align_rows"), "d"),
                  num((a.results.get("data") or {}).get("train_rows"), "d")] for a in arms]
    lines += ["", "## Rows each arm trained on", "",
              *table(["arm", "aligned rows kept", "rows trained on"], data_rows)]
    sources = {r.get("label", ""): (r.get("source", ""), r.get("verified_against_paper"))
               for r in ref["rows"]}
    lines += ["", "## Where the reference numbers come from", ""]
    lines += [f"- {cell(label)}: {src}" + ("" if ok else " (not verified against the paper)")
              for label, (src, ok) in sources.items()]
    if ref.get("not_found"):
        lines += ["", "Not found: " + "; ".join(ref["not_found"]) + "."]
    return "\n".join(line for line in lines if line is not None)


def plot_reference(arms: list[Arm], ref: dict[str, Any], path: str) -> bool:
    """Bars of pass@1 per benchmark: each (arm, model) beside each reference row of its arm.
    False (nothing drawn) when no arm has reference numbers."""
    from matplotlib.figure import Figure

    rows = reference_rows(arms, ref)
    if not rows:
        return False
    benches = benchmark_names([{r["benchmark"]: None for r in rows}])
    series: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["ours_pass@1"] is not None:
            series.setdefault(f"{r['arm']} / {r['model']}", {})[r["benchmark"]] = r["ours_pass@1"]
        series.setdefault(f"paper: {r['reference']}", {})[r["benchmark"]] = r["paper_pass@1"]
    width = 0.8 / max(1, len(series))
    fig = Figure(figsize=(max(5.0, 2.2 * len(benches) + 2.0), 3.8))
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(benches))]
        ax.bar(xs, [values.get(b, float("nan")) for b in benches], width, label=label,
               hatch="//" if label.startswith("paper") else None)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel(f"pass@1 ({ref.get('figure', 'flexible')})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    return True
