"""``<output_dir>/report.html``: one run, in one file a person opens in a browser.

Sections: an overview; each stage's counts, wall time and throughput (from its
``_SUMMARY.json``, ``palign.report.summary_file``; from its indexes for a run from before
summaries were kept); the rejects by reason; histograms of the truncate and align index
columns; a sample of rows (``palign.report.rowsample``), each with its CoT split where the
prefix ends, the probe path, the continuation and its grade; the evaluation's tables and
plots; the audit's; links to the files.

It stays fast at a million rows: the histograms and counts read index columns only, the row
table reads at most ``max_shards`` shards, and a page over ``max_bytes`` shows half the rows
(again, until it fits) and says so. Nothing needs a server or the network to open it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from palign import __version__
from palign.data import storage
from palign.data.digest import count_rows, read_index
from palign.data.layout import DONE_MARKER, INDEX, REJECTS
from palign.report import html as h
from palign.report.rowsample import RowSample, sample_rows
from palign.report.run_files import audit_section, evaluation_section, files_section
from palign.report.summary_file import SUMMARY_FILE, read_summary
from palign.report.svg import Histogram, count_histogram, finite, histogram_svg, ratio_histogram

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
MAX_BYTES = 4_000_000  # over this, the row table is halved until the page fits
STAGE_ORDER = ("ingest", "generate", "truncate", "align", "train", "evaluate")
NOT_STAGES = ("audit", "rejects")
REASON_GROUPS = 30  # reject groups listed per stage (the rest are summed in one line)
HISTOGRAMS = (  # (stage, index column, title, ratio or count)
    ("truncate", "prefix_ratio", "share of the CoT's characters kept", "ratio"),
    ("truncate", "sentence_ratio", "share of the CoT's sentences kept", "ratio"),
    ("truncate", "probes", "judge probes per row", "count"),
    ("truncate", "verify_moves", "verify: moves to a longer prefix", "count"),
    ("align", "continuation_tokens", "continuation tokens per row", "count"),
)


@dataclass
class RunReport:
    """A built page and what went into it (the tests and ``palign report`` read these)."""

    html: str
    rows_shown: int
    rejects_shown: int
    shards_read: list[str]
    histograms: dict[str, int]  # index column -> values counted
    halved: int  # times the row table was halved to fit ``max_bytes``
    build_s: float
    notes: list[str] = field(default_factory=list)


def stage_names(output_dir: str) -> list[str]:
    """The stage folders of a run: the built-in ones in pipeline order, then any other folder
    that holds an index or a summary (a plugin stage's)."""
    names = [n for n in storage.list_dirs(output_dir)
             if not n.startswith((".", "_")) and n not in NOT_STAGES]
    others = [n for n in names if n not in STAGE_ORDER and (
        storage.is_dir(storage.join(output_dir, n, INDEX))
        or storage.is_file(storage.join(output_dir, n, SUMMARY_FILE)))]
    return [s for s in STAGE_ORDER if s in names] + others


def stage_facts(output_dir: str, stage: str) -> dict[str, Any]:
    """One stage's figures: its ``_SUMMARY.json`` when a run left one, else counts from its
    indexes (train: from ``train/summary.json``); ``source`` says which."""
    folder = storage.join(output_dir, stage)
    facts: dict[str, Any] = {"stage": stage,
                             "done": storage.exists(storage.join(folder, DONE_MARKER))}
    summary = read_summary(folder)
    if summary is not None:  # written when the stage finished (the ingest marks it with _DONE)
        return {**facts, **summary, "done": True, "source": SUMMARY_FILE}
    facts["source"] = "indexes"
    if storage.is_dir(storage.join(folder, INDEX)):
        facts["rows_out"] = count_rows(folder)
    if storage.is_dir(storage.join(folder, REJECTS, INDEX)):
        facts["rejected"] = count_rows(storage.join(folder, REJECTS))
    train = storage.join(folder, "summary.json")
    if stage == "train" and storage.is_file(train):
        try:
            done = json.loads(storage.read_text(train))
            facts.update(rows_out=done.get("rows_used"), rejected=done.get("rows_rejected"),
                         stats={"final_loss": done.get("final_loss"),
                                "tokens_per_s": done.get("run_tokens_per_s")},
                         source="train/summary.json")
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable: %s", train, err)
    return facts


def _rate(n: Any, seconds: Any) -> float | None:
    ok = isinstance(n, (int, float)) and isinstance(seconds, (int, float)) and seconds > 0
    return n / seconds if ok and n else None


def stages_section(facts: list[dict[str, Any]]) -> str:
    rows, stats = [], []
    for f in facts:
        eng = f.get("engine") or {}
        ptok = eng.get("prompt_tokens") or 0
        rows.append([f["stage"], "done" if f["done"] else "not done", f.get("rows_in"),
                     f.get("rows_out"), f.get("rejected"), f.get("skipped"), f.get("processed"),
                     f.get("wall_s"), _rate(f.get("processed"), f.get("wall_s")),
                     _rate(eng.get("work_tokens"), f.get("wall_s")),
                     (eng.get("cached_tokens") or 0) / ptok if ptok else None,
                     eng.get("init_s"), eng.get("peak_in_flight"), f["source"]])
        stats += [[f["stage"], k, v] for k, v in (f.get("stats") or {}).items()]
    out = h.table(["stage", "state", "rows in", "rows out", "rejected", "resumed", "processed",
                   "wall s", "rows/s", "tokens/s", "cache share", "engine start s",
                   "peak in flight", "figures from"], rows)
    note = ('<p class="note">rows/s and tokens/s: this run\'s processed rows and engine tokens '
            "(generated or judged) over the stage's wall time, engine start included; cache "
            "share: prompt tokens the engines' prefix caches served. A stage without "
            f"{SUMMARY_FILE} (a run from before palign kept them) shows its index counts only."
            "</p>")
    return out + note + (h.table(["stage", "statistic", "value"], stats) if stats else "")


def reject_groups(folder: str) -> tuple[int, dict[str, int], list[tuple[str, int, str]]]:
    """A rejects folder's count, its count per kind, and its reasons grouped (the text
    before the first ':', numbers as '#'), largest first, each with one whole reason."""
    index = read_index(folder, ("kind", "reason"))
    if not index.num_rows:
        return 0, {}, []
    reason = pc.fill_null(pc.cast(index["reason"], pa.string()), "")
    head = pc.utf8_trim_whitespace(pc.replace_substring_regex(reason, r"(?s):.*", ""))
    head = pc.replace_substring_regex(pc.if_else(pc.equal(head, ""), reason, head), r"\d+", "#")
    kinds = pc.value_counts(pc.fill_null(pc.cast(index["kind"], pa.string()), "row"))
    groups = sorted(((g["values"], g["counts"]) for g in pc.value_counts(head).to_pylist()),
                    key=lambda gc: -gc[1])
    listed = [(g, n, reason[pc.index(head, g).as_py()].as_py())
              for g, n in groups[:REASON_GROUPS]]
    rest = sum(n for _, n in groups[REASON_GROUPS:])
    if rest:
        listed.append((f"{len(groups) - REASON_GROUPS} other groups", rest, ""))
    return index.num_rows, {k["values"]: k["counts"] for k in kinds.to_pylist()}, listed


def rejects_section(output_dir: str, stages: list[str]) -> str:
    parts = []
    for stage in stages:
        folder = storage.join(output_dir, stage, REJECTS)
        if not storage.is_dir(storage.join(folder, INDEX)):
            continue
        total, kinds, groups = reject_groups(folder)
        if not total:
            continue
        by_kind = ", ".join(f"{n:,} {k}" for k, n in sorted(kinds.items()))
        parts.append(f"<h3>{h.esc(stage)}: {total:,} rejects ({h.esc(by_kind)})</h3>" + h.table(
            ["reason", "rows", "share", "example"],
            [[g, n, n / total, h.clipped(ex, 300)] for g, n, ex in groups]))
    return "".join(parts) or '<p class="note">No stage rejected a row.</p>'


def distributions(output_dir: str) -> list[Histogram]:
    """The histograms of ``HISTOGRAMS`` whose stage and column the run has (index only)."""
    out = []
    for stage in dict.fromkeys(s for s, *_ in HISTOGRAMS):
        folder = storage.join(output_dir, stage)
        if not storage.is_dir(storage.join(folder, INDEX)):
            continue
        mine = [x for x in HISTOGRAMS if x[0] == stage]
        index = read_index(folder, tuple(c for _, c, _, _ in mine))
        for _, column, title, kind in mine:
            values = finite(index[column])
            if values.size:
                make = ratio_histogram if kind == "ratio" else count_histogram
                out.append(make(column, title, values))
    return out


def distributions_section(hists: list[Histogram]) -> str:
    if not hists:
        return '<p class="note">No truncate or align index to draw from.</p>'
    charts = "".join(histogram_svg(x) for x in hists)
    stats = h.table(["column", "rows", "mean", "median", "min", "max"],
                    [[x.name, x.total, x.mean, x.median, x.low, x.high] for x in hists])
    return (f'<div class="charts">{charts}</div>{stats}<p class="note">From the stages\' '
            "index columns: every row counted, none read.</p>")


def rows_section(output_dir: str, sample: RowSample, n_rows: int, n_rejects: int,
                 remote: bool, halved: int) -> str:
    if sample.stage is None:
        return '<p class="note">No row stage (align, truncate, generate, ingest) has rows.</p>'
    cards = [h.row_card(s.record, s.kind, h.link(output_dir, s.shard, remote), open_=not i)
             for i, s in enumerate(sample.rows[:n_rows])]
    cards += [h.reject_card(s.record, h.link(output_dir, s.shard, remote))
              for s in sample.rejects[:n_rejects]]
    kinds = sorted(sample.strata) + (["reject"] if sample.rejects[:n_rejects] else [])
    strata = ", ".join(f"{n:,} {k}" for k, n in sorted(sample.strata.items()))
    note = (f'<p class="note">{min(n_rows, len(sample.rows)):,} of the {sample.rows_total:,} '
            f"rows of <code>{h.esc(sample.stage)}</code> ({h.esc(strata)}) and "
            f"{min(n_rejects, len(sample.rejects))} of its rejects, from "
            f"{sample.data_shards_read} of its {sample.shards_total:,} shards (picked by a hash "
            "of their names, every kind of row given a share).</p>")
    for bad in sample.unreadable:
        note += f'<p class="warn">Shard left out (unreadable): {h.clipped(bad, 400)}</p>'
    if halved:
        note += (f'<p class="warn">The row table was halved {halved} time(s) to keep this page '
                 f"under {MAX_BYTES / 1e6:.0f} MB.</p>")
    return note + h.row_controls(kinds) + f'<div id="row-list">{"".join(cards)}</div>'


def build_run_report(output_dir: str | Path, *, rows: int = 200, max_shards: int = 32,
                     max_rejects: int = 20, max_bytes: int = MAX_BYTES) -> RunReport:
    """The page of the run in ``output_dir`` (a local folder or a URI), built, not written."""
    start = time.perf_counter()
    output_dir = storage.absolute(output_dir)
    remote = storage.is_uri(output_dir)
    notes: list[str] = []

    def safely(what: str, fallback: Any, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - one unreadable part must not cost the page
            log.warning("report.html: %s left out: %s", what, err)
            notes.append(f"{what} left out: {type(err).__name__}: {err}")
            return fallback

    def failed(what: str) -> str:
        return f'<p class="warn">{h.esc(what)} could not be read (see the overview).</p>'

    stages = safely("the stage folders", [], stage_names, output_dir)
    facts = [safely(f"{s}'s figures", {"stage": s, "done": False, "source": "unreadable"},
                    stage_facts, output_dir, s) for s in stages]
    hists = safely("the distributions", [], distributions, output_dir)
    sample = safely("the row sample", RowSample(stage=None), sample_rows, output_dir, rows,
                    max_shards, max_rejects)
    fixed = [("stages", "Stages", safely("the stages", failed("The stages"), stages_section,
                                         facts)),
             ("rejects", "Rejects by reason", safely("the rejects", failed("The rejects"),
                                                     rejects_section, output_dir, stages)),
             ("distributions", "Distributions", distributions_section(hists))]
    after = [("evaluation", "Evaluation", safely("the evaluation", failed("The evaluation"),
                                                 evaluation_section, output_dir, remote)),
             ("audit", "Judge audit", safely("the audit", failed("The audit"), audit_section,
                                             output_dir, remote)),
             ("files", "Files", safely("the files", failed("The files"), files_section,
                                       output_dir, stages, sample, remote))]
    name = storage.name(output_dir.rstrip("/"))
    n_rows, n_rejects, halved = len(sample.rows), len(sample.rejects), 0
    while True:
        overview = _overview(output_dir, facts, sample, time.perf_counter() - start, notes)
        text = h.page(f"palign run: {name}", [(i, t) for i, t, _ in [
            ("overview", "Overview", ""), *fixed, ("rows", "Rows", ""), *after]],
            [("overview", "Overview", overview), *fixed,
             ("rows", "Rows", rows_section(output_dir, sample, n_rows, n_rejects, remote,
                                           halved)), *after])
        if len(text.encode("utf-8")) <= max_bytes or n_rows + n_rejects == 0:
            break
        n_rows, n_rejects, halved = n_rows // 2, n_rejects // 2, halved + 1
    return RunReport(html=text, rows_shown=min(n_rows, len(sample.rows)),
                     rejects_shown=min(n_rejects, len(sample.rejects)),
                     shards_read=sample.shards_read,
                     histograms={x.name: x.total for x in hists}, halved=halved,
                     build_s=time.perf_counter() - start, notes=notes)


def _overview(output_dir: str, facts: list[dict[str, Any]], sample: RowSample,
              seconds: float, notes: list[str]) -> str:
    by = {f["stage"]: f for f in facts}
    first = next((f for f in facts if f.get("rows_out") is not None), None)
    rows = [["run folder", h.Markup(f"<code>{h.esc(output_dir)}</code>")],
            ["stages", " -> ".join(f["stage"] for f in facts) or "none"],
            ["rows in (first stage)", (first or {}).get("rows_in") or (first or {})
             .get("rows_out")],
            ["rows kept (align)", by.get("align", {}).get("rows_out")],
            ["rejects (all stages)", sum(int(f.get("rejected") or 0) for f in facts)],
            ["stage figures", ", ".join(f"{f['stage']}: {f['source']}" for f in facts)],
            ["rows shown", f"{len(sample.rows):,} sampled from {sample.stage or '-'}"],
            ["built", f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} by palign "
                      f"{__version__} in {seconds:.2f} s"]]
    warn = "".join(f'<p class="warn">{h.clipped(n, 600)}</p>' for n in notes)
    return h.table([], rows, "facts") + warn


def write_run_report(output_dir: str | Path, **options: Any) -> Path | str:
    """Build the run's page and write it to ``<output_dir>/report.html``, whole; returns
    where (a Path on local disk, the URI's text on object storage). ``options``: those of
    ``build_run_report``."""
    output_dir = storage.absolute(output_dir)
    report = build_run_report(output_dir, **options)
    path = storage.join(output_dir, REPORT_HTML)
    storage.write_text(path, report.html)
    log.info("run report written to %s (%d rows shown, %.1f s)", path, report.rows_shown,
             report.build_s)
    return path if storage.is_uri(output_dir) else Path(path)


def main(args: Any) -> int:
    """``palign report RUN_DIR``: write the run's report.html and print where it is."""
    print(f"report: {write_run_report(args.run_dir)}")
    return 0
