"""The PNGs of one run: pass@1 per benchmark and the truncate stage's prefix ratios."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from palign.data import storage
from palign.report.scores import benchmark_names, flexible_figures


def save_figure(fig: Any, path: Path | str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    storage.write_bytes(path, buf.getvalue())


def plot_pass_at_1(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path | str,
                    title: str) -> None:
    """Bars of pass@1 per benchmark: for each model a solid strict bar and, beside it, a hatched
    flexible bar in the same colour (absent where there is no flexible figure)."""
    # A bare Figure draws with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    benches = benchmark_names(metrics.values())
    models = list(metrics)
    bars_per_bench = 2 * len(models)
    width = 0.8 / bars_per_bench
    fig = Figure(figsize=(max(4.0, 2.0 * len(benches) + 2.0), 3.6))
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        per_bench = [metrics[model].get(b, {}) for b in benches]
        strict = [m.get("pass@1", math.nan) for m in per_bench]
        flexible = [flexible_figures(m).get("pass@1", math.nan) for m in per_bench]
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
    save_figure(fig, path)


def plot_prefix_ratio(prefix: Mapping[str, Any], path: Path | str, title: str) -> None:
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
    save_figure(fig, path)
