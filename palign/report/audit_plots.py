"""The judge audit's PNGs: a reliability diagram (does P(ENOUGH) match how often the student
finishes?) and each row's curve with where binary search and a scan land."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from palign.method.audit import AuditRow
from palign.method.verdict import ENOUGH
from palign.report.plots import save_figure

MAX_CURVES = 16  # panels in curves.png (4 x 4); the rows beyond are in audit.json


def plot_calibration(summary: Mapping[str, Any], path: Path | str, title: str) -> None:
    """Bars of the mean pass rate per P(ENOUGH) bin (count above each) against the diagonal of
    a calibrated judge, with the current and suggested thresholds; without scored points, a
    figure that says why (verdicts generated, or no rollouts)."""
    from matplotlib.figure import Figure

    bins = summary["reliability"]["bins"]
    th = summary["threshold"]
    fig = Figure(figsize=(7.2, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    filled = [b for b in bins if b["n"]]
    if filled:
        bars = ax.bar([b["lo"] for b in filled], [b["pass_rate"] for b in filled],
                      width=[b["hi"] - b["lo"] for b in filled], align="edge", alpha=0.6,
                      edgecolor="black", label="pass rate of the rollouts")
        ax.bar_label(bars, labels=[str(b["n"]) for b in filled], fontsize="x-small")
        ax.plot([b["mean_score"] for b in filled], [b["pass_rate"] for b in filled], "o",
                color="black", markersize=3, label="bin's mean P")
    else:
        ax.text(0.5, 0.5, f"no scored rollout points:\n{th.get('why_none') or ''}",
                ha="center", va="center", wrap=True, fontsize="small")
    ax.axhline(th["target_pass"], color="C2", linestyle="--", linewidth=1,
               label=f"target pass rate {th['target_pass']}")
    ax.axvline(th["current"], color="C3", linewidth=1, label=f"threshold {th['current']}")
    if th.get("suggested") is not None:
        ax.axvline(th["suggested"], color="C1", linestyle="--", linewidth=1,
                   label=f"suggested {th['suggested']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("judge's P(ENOUGH) at the prefix")
    ax.set_ylabel("share of rollouts graded correct")
    error = summary["reliability"].get("calibration_error")
    ece = "" if error is None else f", ECE {error:.3f}"
    ax.set_title(f"{title}: calibration ({sum(b['n'] for b in bins)} points{ece})",
                 fontsize="medium")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(rows: Sequence[AuditRow], path: Path | str, title: str,
                threshold: float) -> None:
    """Up to ``MAX_CURVES`` rows, one panel each: P(ENOUGH) over the share of the CoT k/m
    (1/0 for ENOUGH/NOT_ENOUGH when verdicts were generated), the threshold, binary
    search's prefix (solid) and the scan's (dashed), breaks in red and the rollouts' pass
    rates as squares."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    shown = list(rows)[:MAX_CURVES]
    cols = max(1, min(4, len(shown)))
    lines = max(1, math.ceil(len(shown) / cols))
    # Shared axes with three ticks and one legend: a 4 x 4 grid draws in about a second.
    fig = Figure(figsize=(2.6 * cols + 0.4, 2.0 * lines + 0.9))
    axes = fig.subplots(lines, cols, sharex=True, sharey=True, squeeze=False).flat
    for ax, row in zip(axes, shown):
        _panel(ax, row, threshold)
    for ax in list(axes)[len(shown):]:
        ax.set_axis_off()
    first = fig.axes[0]
    first.set_xticks([0, 0.5, 1])
    first.set_yticks([0, 0.5, 1])
    if not shown:
        first.text(0.5, 0.5, "no audited rows", ha="center", va="center")
    handles = [Line2D([], [], color="C0", marker="o", markersize=3, label="P(ENOUGH)"),
               Line2D([], [], color="grey", linestyle=":", label=f"threshold {threshold}"),
               Line2D([], [], color="C1", label="binary search's k"),
               Line2D([], [], color="C2", linestyle="--", label="scan's k"),
               Line2D([], [], color="red", linewidth=2, label="break"),
               Line2D([], [], color="C4", marker="s", linestyle="", label="rollout pass rate")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize="x-small", frameon=False)
    more = f" (first {len(shown)} of {len(rows)} rows)" if len(rows) > len(shown) else ""
    fig.suptitle(f"{title}: judge curves over k/m{more}", fontsize="medium")
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.65 / fig.get_figheight(),
                        bottom=0.6 / fig.get_figheight(), hspace=0.35, wspace=0.08)
    save_figure(fig, path)


def _panel(ax: Any, row: AuditRow, threshold: float) -> None:
    m = row.sentences_total
    xs = [p.k / m for p in row.curve]
    ys = [p.score if p.score is not None else float(p.verdict == ENOUGH) for p in row.curve]
    ax.plot(xs, ys, "-o", markersize=2, linewidth=1, color="C0")
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.axvline(row.binary_k / m, color="C1", linewidth=1.2)
    ax.axvline(row.scan_k / m, color="C2", linestyle="--", linewidth=1.2)
    at = {p.k: y for p, y in zip(row.curve, ys)}
    if row.breaks:  # one line, NaN between the segments: one artist however many breaks
        bx = [v for a, b in row.breaks for v in (a / m, b / m, math.nan)]
        by = [v for a, b in row.breaks for v in (at.get(a, math.nan), at.get(b, math.nan),
                                                  math.nan)]
        ax.plot(bx, by, color="red", linewidth=2)
    if row.rollouts:
        ax.plot([r.k / m for r in row.rollouts], [r.pass_rate for r in row.rollouts], "s",
                color="C4", markersize=5)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{row.id}: m={m}, binary {row.binary_k}, scan {row.scan_k}, "
                 f"{len(row.breaks)} breaks", fontsize="xx-small")
    ax.tick_params(labelsize="x-small")
