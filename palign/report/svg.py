"""The report's charts: histograms binned with numpy and drawn as inline SVG.

The run report is written after every run, so its charts must cost milliseconds, not the
seconds matplotlib takes to start; an SVG of a few dozen rectangles also needs nothing to
load when the page opens. The values come from index columns (one number per row, a million
rows at most a few MB), never from the rows themselves.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_INTEGER_BINS = 40  # an integer column with more distinct values is binned in ranges


@dataclass
class Histogram:
    """Counts of one column's values: ``counts[i]`` of those in ``[edges[i], edges[i + 1])``
    (the last bin closed); ``labels`` name the bins; ``total`` is every value counted."""

    name: str
    title: str
    unit: str
    edges: list[float]
    counts: list[int]
    labels: list[str]
    total: int
    mean: float | None
    median: float | None
    low: float | None
    high: float | None


def finite(values: Any) -> np.ndarray:
    """The finite numbers of an index column (a pyarrow array or a list): nulls, NaN and
    booleans-as-numbers left out, as float64."""
    if hasattr(values, "to_numpy"):
        if hasattr(values, "combine_chunks"):
            values = values.combine_chunks()
        if hasattr(values, "is_null") and values.null_count:
            values = values.drop_null()
        try:
            arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.asarray([_number(v) for v in values.to_pylist()], dtype=np.float64)
    else:
        arr = np.asarray([_number(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def ratio_histogram(name: str, title: str, values: np.ndarray, bins: int = 20) -> Histogram:
    """A share in [0, 1] in ``bins`` equal bins (a value of exactly 1 goes in the last)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)
    labels = [f"{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(bins)]
    return _made(name, title, "share", values, edges.tolist(), counts, labels)


def count_histogram(name: str, title: str, values: np.ndarray, bins: int = 20) -> Histogram:
    """A count (probes, tokens, moves): a bar per value when there are few distinct values,
    else ``bins`` equal ranges from 0 to the largest."""
    high = int(values.max()) if values.size else 0
    if high < MAX_INTEGER_BINS:
        edges = np.arange(0, high + 2, dtype=np.float64)
        counts = np.bincount(values.astype(np.int64).clip(0), minlength=high + 1)
        labels = [str(i) for i in range(high + 1)]
        return _made(name, title, "count", values, edges.tolist(), counts, labels)
    edges = np.linspace(0.0, float(high), bins + 1)
    counts, _ = np.histogram(values, bins=edges)
    labels = [f"{edges[i]:.0f}-{edges[i + 1]:.0f}" for i in range(bins)]
    return _made(name, title, "count", values, edges.tolist(), counts, labels)


def _made(name: str, title: str, unit: str, values: np.ndarray, edges: list[float],
          counts: Any, labels: list[str]) -> Histogram:
    some = bool(values.size)
    return Histogram(
        name=name, title=title, unit=unit, edges=edges, counts=[int(c) for c in counts],
        labels=labels, total=int(values.size),
        mean=float(values.mean()) if some else None,
        median=float(np.median(values)) if some else None,
        low=float(values.min()) if some else None, high=float(values.max()) if some else None)


def histogram_svg(h: Histogram, width: int = 460, height: int = 210) -> str:
    """``h`` as an SVG bar chart: each bar's count and range in its tooltip (``<title>``),
    the axis labelled at its two ends and the tallest bar's count."""
    left, right, top, bottom = 44, 8, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(h.counts) if h.counts else 0
    n = max(1, len(h.counts))
    bar_w = plot_w / n
    esc = html.escape
    parts = [f'<svg class="chart" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<title>{esc(h.title)}</title>',
             f'<text x="{left}" y="14" class="t">{esc(h.title)} (n={h.total:,})</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             f'class="axis"/>',
             f'<text x="{left - 4}" y="{top + 4}" class="y">{peak:,}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" class="y">0</text>']
    for i, c in enumerate(h.counts):
        bh = plot_h * c / peak if peak else 0.0
        x = left + i * bar_w
        parts.append(f'<rect x="{x + 0.5:.1f}" y="{top + plot_h - bh:.1f}" '
                     f'width="{max(bar_w - 1, 0.5):.1f}" height="{bh:.1f}">'
                     f'<title>{esc(h.labels[i])}: {c:,}</title></rect>')
    if h.labels:
        first, last = h.labels[0].split("-")[0], h.labels[-1].split("-")[-1]
        parts.append(f'<text x="{left}" y="{height - 18}" class="x0">{esc(first)}</text>')
        parts.append(f'<text x="{left + plot_w}" y="{height - 18}" class="x1">'
                     f'{esc(last)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" class="xl">'
                 f'{esc(h.name)}</text></svg>')
    return "".join(parts)
