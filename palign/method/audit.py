"""Auditing the judge: is "enough" monotone in the prefix length, and does P(ENOUGH) say how
often the student really finishes? Pure: no engine, no I/O.

One audited row probes the judge on a grid of prefix lengths (``probe_grid``: every k, or an
even grid on long CoTs), which gives its curve of (k, P(ENOUGH), verdict). From the curve:

- the binary search truncate runs is replayed (``replay_binary``: the real ``BinarySearch``;
  a k it asks for off the grid is probed too, ``next_missing`` names it) and set against a full
  scan (``scan_choice``, the shortest k judged ENOUGH). On a monotone curve the two agree, so a
  difference always points at a break;
- ``monotonicity_breaks``: neighbours where a longer prefix is judged less sufficient;
- the student is rolled out from a few prefixes (``rollout_points``), which gives the real
  chance of finishing correctly at those k.

Over many rows, the (P, pass rate) points give the judge's ``agreement`` with the rollouts at a
threshold, the ``best_threshold`` for a target pass rate, a ``reliability`` table, and the
finish rate a threshold would give (``finish_rate_at``). ``AuditRow`` is the audit's record
(``to_record``/``from_record``: the JSON row under ``<output_dir>/audit/rows/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from palign.method.search import BinarySearch, Probe, SearchResult
from palign.method.verdict import ENOUGH

DROP_TOL = 0.05  # a P(ENOUGH) drop between neighbours larger than this is a break
RELIABILITY_BINS = 10
Pair = tuple[float, float]  # (P(ENOUGH) at a prefix, pass rate of the rollouts from it)


@dataclass(frozen=True)
class Rollout:
    """K graded samples of the student continuing the prefix of ``k`` sentences."""

    k: int
    n: int  # samples
    passed: int  # graded correct (continuation, or the prefix where it had no answer)
    from_prefix: int = 0  # of ``passed``: graded from the prefix, the continuation had none
    tokens: int = 0  # completion tokens of the n samples
    score: float | None = None  # P(ENOUGH) at k (None: verdicts generated, or k off the curve)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.n if self.n else 0.0

    @property
    def continuation_rate(self) -> float:
        """The pass rate without the prefix fallback (which favours long prefixes)."""
        return (self.passed - self.from_prefix) / self.n if self.n else 0.0


@dataclass
class AuditRow:
    """One audited row: its curve, where binary search and a scan land, its breaks and
    rollouts."""

    id: str
    sentences_total: int
    threshold: float
    verdict_mode: str  # "score" or "generate" (then every score is None)
    curve: list[Probe]  # ascending k
    binary_k: int
    binary_sufficient: bool
    binary_probes: list[int]  # the ks binary search asked for, in order
    scan_k: int
    breaks: list[tuple[int, int]]
    rollouts: list[Rollout] = field(default_factory=list)

    def score_at(self, k: int) -> float | None:
        return next((p.score for p in self.curve if p.k == k), None)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id, "sentences_total": self.sentences_total,
            "threshold": self.threshold, "verdict_mode": self.verdict_mode,
            "curve": [{"k": p.k, "score": p.score, "verdict": p.verdict} for p in self.curve],
            "binary": {"k": self.binary_k, "probes": list(self.binary_probes),
                       "sufficient": self.binary_sufficient},
            "scan_k": self.scan_k,
            "breaks": [list(b) for b in self.breaks],
            "rollouts": [{"k": r.k, "score": r.score, "n": r.n, "passed": r.passed,
                          "from_prefix": r.from_prefix, "tokens": r.tokens}
                         for r in self.rollouts],
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> AuditRow:
        binary = rec["binary"]
        return cls(
            id=str(rec["id"]), sentences_total=int(rec["sentences_total"]),
            threshold=float(rec["threshold"]), verdict_mode=str(rec["verdict_mode"]),
            curve=[Probe(int(p["k"]), str(p["verdict"]), p.get("score")) for p in rec["curve"]],
            binary_k=int(binary["k"]), binary_sufficient=bool(binary.get("sufficient", True)),
            binary_probes=[int(k) for k in binary.get("probes") or []],
            scan_k=int(rec["scan_k"]),
            breaks=[(int(a), int(b)) for a, b in rec.get("breaks") or []],
            rollouts=[Rollout(int(r["k"]), int(r["n"]), int(r["passed"]),
                              int(r.get("from_prefix") or 0), int(r.get("tokens") or 0),
                              r.get("score")) for r in rec.get("rollouts") or []],
        )


def probe_grid(m: int, max_probes: int = 64) -> list[int]:
    """The prefix lengths to probe on a CoT of ``m`` sentences: every k when there are at most
    ``max_probes``, else ``max_probes`` evenly spread ones, 1 and m among them."""
    if m < 1:
        raise ValueError("a CoT needs at least one sentence")
    if max_probes < 2:
        raise ValueError(f"max_probes must be at least 2, got {max_probes}")
    if m <= max_probes:
        return list(range(1, m + 1))
    step = (m - 1) / (max_probes - 1)
    return sorted({1 + round(i * step) for i in range(max_probes)})


def replay_binary(m: int, verdict_at: Callable[[int], tuple[str, float | None]]
                  ) -> SearchResult:
    """The binary search truncate runs on ``m`` sentences, told (verdict, score) by
    ``verdict_at(k)`` for each k it asks for."""
    search = BinarySearch(m)
    while (k := search.next_probe()) is not None:
        search.record(k, *verdict_at(k))
    return search.result()


def next_missing(m: int, known: Mapping[int, Probe]) -> int | None:
    """The first k the binary search over ``m`` sentences asks for that ``known`` lacks (probe
    it, add it and ask again), or None when the search can be replayed from ``known``."""
    search = BinarySearch(m)
    while (k := search.next_probe()) is not None:
        if k not in known:
            return k
        search.record(k, known[k].verdict, known[k].score)
    return None


def scan_choice(curve: Sequence[Probe], m: int) -> int:
    """What a full scan keeps: the shortest probed k judged ENOUGH, else all ``m`` sentences
    (as binary search keeps them when nothing is sufficient)."""
    return min((p.k for p in curve if p.verdict == ENOUGH), default=m)


def monotonicity_breaks(curve: Sequence[Probe], tol: float = DROP_TOL
                        ) -> list[tuple[int, int]]:
    """Neighbouring probes (ki < kj, nothing probed between) where the longer prefix is judged
    less sufficient: ENOUGH then not ENOUGH, or P(ENOUGH) falling by more than ``tol``."""
    ordered = sorted(curve, key=lambda p: p.k)
    found = []
    for a, b in zip(ordered, ordered[1:]):
        flip = a.verdict == ENOUGH and b.verdict != ENOUGH
        drop = a.score is not None and b.score is not None and a.score - b.score > tol
        if flip or drop:
            found.append((a.k, b.k))
    return found


def rollout_points(m: int, binary_k: int, scan_k: int, points: int = 3,
                   curve_ks: Sequence[int] | None = None) -> list[int]:
    """The prefixes to roll out from, ascending: binary search's and the scan's, then a
    quarter, half and all of the CoT (each moved to the nearest of ``curve_ks`` when given, so
    it has a score), at most ``points`` of them, in that order of priority."""
    wanted = [binary_k, scan_k] + [max(1, math.ceil(f * m)) for f in (0.25, 0.5, 1.0)]
    if curve_ks:
        wanted = wanted[:2] + [min(curve_ks, key=lambda k, w=w: (abs(k - w), k))
                               for w in wanted[2:]]
    chosen: list[int] = []
    for k in wanted:
        if k not in chosen and len(chosen) < points:
            chosen.append(k)
    return sorted(chosen)


def audit_row(row_id: str, m: int, threshold: float, verdict_mode: str,
              probes: Iterable[Probe], tol: float = DROP_TOL) -> AuditRow:
    """A row's audit from its probes (the grid's and those binary search needed off it, in
    any order; the first of a repeated k counts); rollouts come later (``with_rollouts``).
    ValueError when binary search would need a k that was not probed (``next_missing``)."""
    known: dict[int, Probe] = {}
    for p in probes:
        known.setdefault(p.k, p)
    if (k := next_missing(m, known)) is not None:
        raise ValueError(f"row {row_id}: binary search needs k={k}, which was not probed")
    curve = [known[k] for k in sorted(known)]
    result = replay_binary(m, lambda k: (known[k].verdict, known[k].score))
    return AuditRow(
        id=row_id, sentences_total=m, threshold=threshold, verdict_mode=verdict_mode,
        curve=curve, binary_k=result.kept, binary_sufficient=result.sufficient,
        binary_probes=[p.k for p in result.probes], scan_k=scan_choice(curve, m),
        breaks=monotonicity_breaks(curve, tol))


def with_rollouts(row: AuditRow, rollouts: Iterable[Rollout]) -> AuditRow:
    """``row`` with its rollouts (ascending k), each given the curve's score at its k."""
    done = sorted((replace(r, score=row.score_at(r.k)) for r in rollouts), key=lambda r: r.k)
    return replace(row, rollouts=done)


def rollout_pairs(rows: Iterable[AuditRow]) -> list[Pair]:
    """(P(ENOUGH), pass rate) of every rollout point that has a score and samples."""
    return [(r.score, r.pass_rate) for row in rows for r in row.rollouts
            if r.score is not None and r.n > 0]


@dataclass(frozen=True)
class Agreement:
    """The judge's verdict at a threshold (P >= t) against the rollouts (pass rate >=
    target): the confusion counts, accuracy, balanced accuracy and the rank AUC of P."""

    threshold: float
    target: float
    tp: int  # judged enough, and the student finishes
    fp: int  # judged enough, but the student does not finish
    fn: int
    tn: int
    accuracy: float | None
    balanced_accuracy: float | None  # None: the rollouts are all one class
    auc: float | None  # P(a finishing point scores above a failing one), ties half


def agreement(pairs: Sequence[Pair], threshold: float, target: float) -> Agreement:
    tp = sum(1 for s, r in pairs if s >= threshold and r >= target)
    fp = sum(1 for s, r in pairs if s >= threshold and r < target)
    fn = sum(1 for s, r in pairs if s < threshold and r >= target)
    tn = len(pairs) - tp - fp - fn
    ba = _balanced(tp, fp, fn, tn)
    return Agreement(threshold, target, tp, fp, fn, tn,
                     (tp + tn) / len(pairs) if pairs else None,
                     None if ba is None else float(ba),
                     rank_auc([s for s, _ in pairs], [r >= target for _, r in pairs]))


def rank_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """The Mann-Whitney AUC of ``scores`` for the True labels (tied scores share their mean
    rank, so a tie counts half); None without both labels."""
    pos = sum(labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in order[i:j + 1]:
            ranks[t] = (i + j) / 2 + 1
        i = j + 1
    pos_ranks = sum(r for r, y in zip(ranks, labels) if y)
    return (pos_ranks - pos * (pos + 1) / 2) / (pos * neg)


def _balanced(tp: int, fp: int, fn: int, tn: int) -> Fraction | None:
    if not (tp + fn) or not (tn + fp):
        return None
    return (Fraction(tp, tp + fn) + Fraction(tn, tn + fp)) / 2


@dataclass(frozen=True)
class Suggestion:
    """The threshold that best separates the prefixes the student finishes from the others."""

    threshold: float
    balanced_accuracy: float
    low: float  # the tied interval of equally good candidates it is the middle of
    high: float


def best_threshold(pairs: Sequence[Pair], target: float) -> Suggestion | None:
    """The threshold that maximises balanced accuracy against pass rate >= ``target``. The
    candidates are the midpoints between neighbouring distinct scores; several equally good
    neighbouring candidates form a tied interval, and the suggestion is its middle (of tied
    intervals, the longest, then the lowest). None without two distinct scores, when the
    rollouts are all one class, or when no candidate beats chance (balanced accuracy 1/2,
    what calling every prefix ENOUGH gives): then P(ENOUGH) does not tell them apart."""
    scores = sorted({s for s, _ in pairs})
    if len(scores) < 2:
        return None
    cands = [(a + b) / 2 for a, b in zip(scores, scores[1:])]
    values = []
    for t in cands:
        a = agreement(pairs, t, target)
        ba = _balanced(a.tp, a.fp, a.fn, a.tn)
        if ba is None:
            return None
        values.append(ba)
    best = max(values)
    if best <= Fraction(1, 2):
        return None
    runs: list[tuple[int, int]] = []  # (first, last) index of each run of best candidates
    for i, v in enumerate(values):
        if v == best:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
    first, last = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    return Suggestion((cands[first] + cands[last]) / 2, float(best), cands[first], cands[last])


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    n: int
    mean_score: float | None
    pass_rate: float | None  # the mean pass rate of the points in the bin


def reliability(pairs: Sequence[Pair], bins: int = RELIABILITY_BINS) -> list[Bin]:
    """The reliability table: points binned by P(ENOUGH) into ``bins`` equal bins over [0, 1]
    (1.0 in the last), each bin's mean P against its mean pass rate."""
    grouped: list[list[Pair]] = [[] for _ in range(bins)]
    for s, r in pairs:
        grouped[min(int(s * bins), bins - 1)].append((s, r))
    return [Bin(i / bins, (i + 1) / bins, len(g),
                sum(s for s, _ in g) / len(g) if g else None,
                sum(r for _, r in g) / len(g) if g else None) for i, g in enumerate(grouped)]


def calibration_error(table: Sequence[Bin]) -> float | None:
    """The expected calibration error: bins' |mean P - pass rate|, weighted by their points."""
    total = sum(b.n for b in table)
    if not total:
        return None
    return sum(b.n * abs(b.mean_score - b.pass_rate) for b in table if b.n) / total


@dataclass(frozen=True)
class FinishRate:
    """The mean pass rate at the prefixes a scan at ``threshold`` keeps. ``exact`` rows had
    rollouts at that very k; the others' rates are ``interpolated`` linearly in k between
    their rollout points (the nearest one beyond them)."""

    threshold: float
    rate: float | None
    rows: int
    exact: int
    interpolated: int


def finish_rate_at(rows: Iterable[AuditRow], t: float) -> FinishRate:
    """The finish rate threshold ``t`` would give, over the rows with scores and rollouts."""
    rates, exact = [], 0
    for row in rows:
        scored = [p for p in row.curve if p.score is not None]
        points = sorted((r.k, r.pass_rate) for r in row.rollouts if r.n > 0)
        if not scored or not points:
            continue
        k = min((p.k for p in scored if p.score >= t), default=row.sentences_total)
        rate, hit = _interpolate(points, k)
        rates.append(rate)
        exact += hit
    return FinishRate(t, sum(rates) / len(rates) if rates else None, len(rates), exact,
                      len(rates) - exact)


def _interpolate(points: Sequence[tuple[int, float]], k: int) -> tuple[float, bool]:
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= k <= k1:
            if k in (k0, k1):
                return (r0 if k == k0 else r1), True
            return r0 + (r1 - r0) * (k - k0) / (k1 - k0), False
    nearest = min(points, key=lambda p: abs(p[0] - k))
    return nearest[1], nearest[0] == k
