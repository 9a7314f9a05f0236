"""The judge audit's files: ``audit.json`` (``palign.audit/1``), ``audit.md``,
``calibration.png`` and ``curves.png`` under ``<output_dir>/audit/``, from the audited rows
(``palign.method.audit.AuditRow`` records, which the audit stage writes under ``audit/rows/``).

What a reader gets: how many rows, probes and rollouts; how often "enough" is not monotone in
the prefix length and how often binary search lands elsewhere than a full scan (which only a
break can cause); how well P(ENOUGH) at the current threshold agrees with the rollouts at the
target pass rate, the threshold that would agree best, and the finish rates both give; a
reliability table; and how closely the audit's scores reproduce truncate's stored probes.
docs/audit.md says how to read them and when to move ``truncate.threshold``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from palign.data import storage
from palign.method.audit import (
    DROP_TOL,
    AuditRow,
    agreement,
    best_threshold,
    calibration_error,
    finish_rate_at,
    reliability,
    rollout_pairs,
)
from palign.method.verdict import ENOUGH
from palign.report.markdown import MISSING, cell, num, table

log = logging.getLogger(__name__)

AUDIT_FORMAT = "palign.audit/1"
AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"
CALIBRATION_PNG, CURVES_PNG = "calibration.png", "curves.png"
MD_ROWS = 50  # rows listed in audit.md (audit.json lists them all)


@dataclass(frozen=True)
class AuditSettings:
    """How the audit ran: the run's current threshold and verdict mode, and the audit's
    options (``palign audit``'s flags)."""

    threshold: float  # truncate.threshold of the run
    target_pass: float = 0.5  # a prefix "finishes" when this share of its rollouts pass
    verdict_mode: str = "score"
    rollouts: int = 4  # samples per rollout point
    points: int = 3  # rollout points per row
    max_probes: int = 64  # grid size on long CoTs
    sample: int | None = None  # rows asked for
    tol: float = DROP_TOL  # P drop between neighbours that counts as a break
    config: str | None = None  # the config file audited


def summarise(rows: Sequence[AuditRow], settings: AuditSettings,
              stored: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The content of audit.json. ``stored``: truncate's stored probes (``{k, verdict,
    score}``) by row id, to say how closely the audit's scores reproduce them."""
    pairs = rollout_pairs(rows)
    t, target = settings.threshold, settings.target_pass
    differ = [r for r in rows if r.binary_k != r.scan_k]
    flips = sum(_is_flip(r, a, b) for r in rows for a, b in r.breaks)
    breaks = sum(len(r.breaks) for r in rows)
    agree = agreement(pairs, t, target) if pairs else None
    suggestion = best_threshold(pairs, target)
    bins = reliability(pairs)
    return {
        "format": AUDIT_FORMAT,
        "settings": asdict(settings),
        "counts": {
            "rows": len(rows),
            "probes": sum(len(r.curve) for r in rows),
            "scored_rows": sum(any(p.score is not None for p in r.curve) for r in rows),
            "rollout_points": sum(len(r.rollouts) for r in rows),
            "rollout_samples": sum(x.n for r in rows for x in r.rollouts),
            "rollout_tokens": sum(x.tokens for r in rows for x in r.rollouts),
            "mean_sentences": _mean([r.sentences_total for r in rows]),
        },
        "monotonicity": {"tol": settings.tol, "breaks": breaks, "flips": flips,
                         "drops": breaks - flips,
                         "rows_with_breaks": sum(bool(r.breaks) for r in rows),
                         "share_rows": _share(sum(bool(r.breaks) for r in rows), len(rows))},
        "binary_vs_scan": {
            "rows": len(rows), "differ": len(differ), "share": _share(len(differ), len(rows)),
            "binary_longer": sum(r.binary_k > r.scan_k for r in differ),
            "binary_shorter": sum(r.binary_k < r.scan_k for r in differ),
            "ids": [r.id for r in differ]},
        "agreement": None if agree is None else {**asdict(agree), "points": len(pairs)},
        "threshold": {
            "current": t, "target_pass": target,
            "current_balanced_accuracy": agree.balanced_accuracy if agree else None,
            "suggested": suggestion.threshold if suggestion else None,
            "suggested_balanced_accuracy": suggestion.balanced_accuracy if suggestion else None,
            "tied": [suggestion.low, suggestion.high] if suggestion else None,
            "why_none": None if suggestion else _why_no_suggestion(pairs, target, settings)},
        "finish": {
            "at_binary": _finish_at(rows, lambda r: r.binary_k),
            "at_scan": _finish_at(rows, lambda r: r.scan_k),
            "at_current": asdict(finish_rate_at(rows, t)) if pairs else None,
            "at_suggested": asdict(finish_rate_at(rows, suggestion.threshold))
            if suggestion else None},
        "reliability": {"bins": [asdict(b) for b in bins],
                        "calibration_error": calibration_error(bins)},
        "stored": _stored(rows, stored) if stored is not None else None,
        "rows": [{"id": r.id, "sentences_total": r.sentences_total, "binary_k": r.binary_k,
                  "scan_k": r.scan_k, "breaks": len(r.breaks),
                  "rollouts": [[x.k, x.passed, x.n] for x in r.rollouts]} for r in rows],
    }


def write_audit(audit_dir: str | Path, rows: Iterable[AuditRow | Mapping[str, Any]],
                settings: AuditSettings,
                stored: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                title: str = "judge audit") -> dict[str, Any]:
    """Write audit.json, audit.md, calibration.png and curves.png into ``audit_dir`` (a path
    or URI) from the audited rows (records or ``AuditRow``s, any order: sorted by id); returns
    audit.json's content."""
    from palign.report.audit_plots import plot_calibration, plot_curves

    audited = sorted((r if isinstance(r, AuditRow) else AuditRow.from_record(r) for r in rows),
                     key=lambda r: r.id)
    summary = summarise(audited, settings, stored)
    storage.write_text(storage.join(audit_dir, AUDIT_JSON), json.dumps(summary, indent=2) + "\n")
    storage.write_text(storage.join(audit_dir, AUDIT_MD), format_audit(summary) + "\n")
    plot_calibration(summary, storage.join(audit_dir, CALIBRATION_PNG), title)
    plot_curves(audited, storage.join(audit_dir, CURVES_PNG), title, settings.threshold)
    log.info("judge audit of %d row(s) written to %s", len(audited), audit_dir)
    return summary


def _is_flip(row: AuditRow, a: int, b: int) -> bool:
    verdicts = {p.k: p.verdict for p in row.curve}
    return verdicts.get(a) == ENOUGH and verdicts.get(b) != ENOUGH


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _finish_at(rows: Sequence[AuditRow], chosen: Any) -> dict[str, Any]:
    """The pass rates of the rollouts at each row's ``chosen(row)`` k (all and without the
    prefix fallback), over the rows rolled out there."""
    hits = [x for r in rows for x in r.rollouts if x.k == chosen(r) and x.n]
    return {"rows": len(hits), "rate": _mean([x.pass_rate for x in hits]),
            "continuation_rate": _mean([x.continuation_rate for x in hits])}


def _why_no_suggestion(pairs: Sequence[tuple[float, float]], target: float,
                       settings: AuditSettings) -> str:
    if settings.verdict_mode != "score":
        return "verdicts were generated, so there are no scores: audit with verdict: score"
    if not pairs:
        return "no rollout has a score"
    finishing = sum(r >= target for _, r in pairs)
    if finishing in (0, len(pairs)):
        return (f"every rollout point {'reached' if finishing else 'missed'} the target pass "
                f"rate {target}: nothing to separate (sample more rows or points)")
    if len({s for s, _ in pairs}) < 2:
        return "every rollout point has the same score"
    return ("no threshold does better than chance: P(ENOUGH) does not rank the prefixes the "
            "student finishes above those it does not (see the AUC)")


def _stored(rows: Sequence[AuditRow], stored: Mapping[str, Sequence[Mapping[str, Any]]]
            ) -> dict[str, Any]:
    """How the audit's curve compares with truncate's stored probes at the same k (batching
    can move a score slightly, so this is reported, never asserted)."""
    deltas, verdicts, joined = [], 0, 0
    for row in rows:
        probes = stored.get(row.id)
        if probes is None:
            continue
        joined += 1
        curve = {p.k: p for p in row.curve}
        for p in probes:
            mine = curve.get(int(p["k"]))
            if mine is None:
                continue
            verdicts += mine.verdict != p.get("verdict")
            if mine.score is not None and p.get("score") is not None:
                deltas.append(abs(mine.score - float(p["score"])))
    return {"rows": joined, "probes": len(deltas), "max_abs_dp": max(deltas, default=None),
            "verdicts_differ": verdicts}


# -- audit.md


def format_audit(s: Mapping[str, Any]) -> str:
    """The Markdown of an audit (audit.json's content)."""
    st, c, mono, bvs = s["settings"], s["counts"], s["monotonicity"], s["binary_vs_scan"]
    th, fin = s["threshold"], s["finish"]
    lines = ["# Judge audit", "",
             f"{c['rows']} rows (mean {num(c['mean_sentences'], '.1f')} sentences), "
             f"{c['probes']} probes; {c['rollout_points']} rollout points of {st['rollouts']} "
             f"samples ({c['rollout_samples']} samples, {c['rollout_tokens']} tokens). "
             f"Verdicts: {st['verdict_mode']}; threshold {st['threshold']}; target pass rate "
             f"{st['target_pass']}. How to read this: docs/audit.md.", "",
             "## Monotonicity", "",
             f"{mono['breaks']} breaks in {mono['rows_with_breaks']} of {c['rows']} rows: "
             f"{mono['flips']} where ENOUGH turns NOT_ENOUGH, {mono['drops']} more where P "
             f"falls by over {mono['tol']} from one probed prefix to the next longer one.",
             "", "## Binary search against a full scan", "",
             f"Binary search keeps another prefix than a scan in {bvs['differ']} of {bvs['rows']} "
             f"rows ({num(bvs['share'], '.0%')}): longer in {bvs['binary_longer']}, shorter in "
             f"{bvs['binary_shorter']}. On a monotone curve they agree."]
    if bvs["ids"]:
        lines.append("Rows: " + ", ".join(cell(i) for i in bvs["ids"][:MD_ROWS]) + ".")
    lines += ["", "## Agreement with the rollouts", ""]
    a = s["agreement"]
    if a is None:
        lines.append(f"No rollout point has a score: {th['why_none']}.")
    else:
        lines += [f"{a['points']} points; judged ENOUGH at P >= {a['threshold']}, finishing at "
                  f"pass rate >= {a['target']}. Accuracy {num(a['accuracy'], '.3f')}, balanced "
                  f"accuracy {num(a['balanced_accuracy'], '.3f')}, AUC {num(a['auc'], '.3f')}.",
                  "", *table(["", "finishes", "does not finish"],
                             [["judged ENOUGH", str(a["tp"]), str(a["fp"])],
                              ["judged NOT_ENOUGH", str(a["fn"]), str(a["tn"])]])]
    lines += ["", "## Threshold", "", *table(
        ["threshold", "value", "balanced accuracy", "finish rate (scan at it)", "rows (exact)"],
        [_threshold_row("current", th["current"], th["current_balanced_accuracy"],
                        fin["at_current"]),
         _threshold_row("suggested", th["suggested"], th["suggested_balanced_accuracy"],
                        fin["at_suggested"])])]
    if th["suggested"] is None:
        lines.append(f"\nNo suggestion: {th['why_none']}.")
    elif th["tied"] and th["tied"][0] != th["tied"][1]:
        lines.append(f"\nEvery threshold in [{th['tied'][0]:.3f}, {th['tied'][1]:.3f}] does as "
                     "well; the suggestion is its middle.")
    lines += ["", "Finish rates between rollout points are interpolated in k.", "",
              "## Finish rates at the chosen prefixes", "",
              *table(["prefix", "rows", "pass rate", "continuation only"],
                     [[name, str(f["rows"]), num(f["rate"], ".3f"),
                       num(f["continuation_rate"], ".3f")]
                      for name, f in (("binary search", fin["at_binary"]),
                                      ("scan", fin["at_scan"]))]),
              "", "## Reliability", ""]
    bins = [b for b in s["reliability"]["bins"] if b["n"]]
    if bins:
        lines += [f"Expected calibration error "
                  f"{num(s['reliability']['calibration_error'], '.3f')}.", "",
                  *table(["P(ENOUGH)", "points", "mean P", "pass rate"],
                         [[f"{b['lo']:.1f}-{b['hi']:.1f}", str(b["n"]),
                           num(b["mean_score"], ".3f"), num(b["pass_rate"], ".3f")]
                          for b in bins])]
    else:
        lines.append("No scored rollout points (calibration needs verdict: score).")
    if s["stored"] is not None:
        d = s["stored"]
        lines += ["", "## Stored probes reproduced", "",
                  f"{d['rows']} rows joined with truncate's records; {d['probes']} scores "
                  f"compared, max |dP| {num(d['max_abs_dp'], '.2e')}; verdicts differ at "
                  f"{d['verdicts_differ']} probes."]
    lines += ["", "## Rows", "", *table(
        ["id", "sentences", "binary k", "scan k", "breaks", "rollouts (k: passed/n)"],
        [[cell(r["id"]), str(r["sentences_total"]), str(r["binary_k"]), str(r["scan_k"]),
          str(r["breaks"]), ", ".join(f"{k}: {p}/{n}" for k, p, n in r["rollouts"]) or MISSING]
         for r in s["rows"][:MD_ROWS]])]
    if len(s["rows"]) > MD_ROWS:
        lines.append(f"\n(first {MD_ROWS} of {len(s['rows'])} rows; audit.json has them all)")
    return "\n".join(lines)


def _threshold_row(name: str, value: float | None, ba: float | None,
                   finish: Mapping[str, Any] | None) -> list[str]:
    rate = None if finish is None else finish["rate"]
    rows = MISSING if finish is None else f"{finish['rows']} ({finish['exact']})"
    return [name, num(value, ".3f"), num(ba, ".3f"), num(rate, ".3f"), rows]
