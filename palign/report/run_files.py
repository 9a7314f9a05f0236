"""The run report's sections on the files beside the rows: the evaluation's results and
plots, the judge audit's, and links to every stage folder's shards (``palign.report
.run_report`` assembles the page). A PNG is inlined as a ``data:`` URI, so the page stays one
file; a link is relative to the report (it sits in the run folder), or a URI's text on object
storage, which a browser cannot open."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from palign.data import storage
from palign.report import html as h
from palign.report.rowsample import RowSample
from palign.report.summary_file import SUMMARY_FILE

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 1_500_000  # a bigger PNG is linked, not inlined


def image(output_dir: str, rel: str, remote: bool) -> str:
    """A PNG of the run inlined as a ``data:`` URI (a link when it is too big)."""
    path = storage.join(output_dir, rel)
    if not storage.is_file(path):
        return ""
    if storage.file_size(path) > MAX_IMAGE_BYTES:
        return f"<p>{h.link(output_dir, rel, remote)} (too big to inline)</p>"
    data = base64.b64encode(storage.read_bytes(path)).decode("ascii")
    return f'<p><img class="plot" alt="{h.esc(rel)}" src="data:image/png;base64,{data}"></p>'


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object the run wrote; None when it is missing or unreadable (logged)."""
    if not storage.is_file(path):
        return None
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable: %s", path, err)
        return None
    return value if isinstance(value, dict) else None


def evaluation_section(output_dir: str, remote: bool) -> str:
    results = read_json(storage.join(output_dir, "evaluate", "results.json"))
    if results is None:
        return ('<p class="note">No readable evaluate/results.json: the run did not evaluate '
                '(or its results are not a JSON object).</p>')
    models = results.get("models") if isinstance(results.get("models"), dict) else {}
    benches = list(dict.fromkeys(b for m in models.values() if isinstance(m, dict) for b in m))
    parts = []
    for bench in benches:
        per = [(m, v[bench]) for m, v in models.items() if isinstance(v, dict)
               and isinstance(v.get(bench), dict)]
        keys = sorted({k for _, f in per for k in f if k.startswith("pass@")},
                      key=lambda k: int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0)
        rows = [[m, f.get("problems"), f.get("n"), *[f.get(k) for k in keys],
                 *[(f.get("flexible") or {}).get(k) for k in keys], f.get("mean_output_tokens"),
                 f.get("no_answer_share"), f.get("timeouts")] for m, f in per]
        parts.append(f"<h3>{h.esc(bench)}</h3>" + h.table(
            ["model", "problems", "n", *keys, *[f"flexible {k}" for k in keys],
             "mean output tokens", "no answer", "timeouts"], rows))
    data = results.get("data") if isinstance(results.get("data"), dict) else {}
    if data:
        parts.append(h.table(["align rows kept", "train rows used"],
                             [[data.get("align_rows"), data.get("train_rows")]]))
    parts += [image(output_dir, "evaluate/pass_at_1.png", remote),
              image(output_dir, "evaluate/prefix_ratio.png", remote)]
    return "".join(parts)


def audit_section(output_dir: str, remote: bool) -> str:
    audit = read_json(storage.join(output_dir, "audit", "audit.json"))
    if audit is None:
        return ('<p class="note">No audit in this run folder (<code>palign audit CONFIG '
                "--sample N</code> writes one under audit/).</p>")
    flat = [[k, v] for k, v in audit.items() if not isinstance(v, (dict, list))]
    flat += [[f"{k}.{k2}", v2] for k, v in audit.items() if isinstance(v, dict)
             for k2, v2 in v.items() if not isinstance(v2, (dict, list))]
    return (h.table(["figure", "value"], flat[:60])
            + f"<p>{h.link(output_dir, 'audit/audit.md', remote)}</p>"
            + image(output_dir, "audit/calibration.png", remote)
            + image(output_dir, "audit/curves.png", remote))


def files_section(output_dir: str, stages: list[str], sample: RowSample, remote: bool) -> str:
    rows = []
    for stage in stages:
        folder = storage.join(output_dir, stage)
        shards = storage.list_files(folder, prefix="part-")
        listed = " ".join(str(h.link(output_dir, f"{stage}/{n}", remote)) for n in shards[:3])
        more = f" and {len(shards) - 3:,} more" if len(shards) > 3 else ""
        summary = h.link(output_dir, f"{stage}/{SUMMARY_FILE}", remote) \
            if storage.is_file(storage.join(folder, SUMMARY_FILE)) else "-"
        rows.append([h.link(output_dir, f"{stage}/", remote), len(shards),
                     h.Markup(listed + h.esc(more)), summary])
    extra = [rel for rel in ("evaluate/results.json", "evaluate/results.md",
                             "evaluate/samples.jsonl", "audit/audit.json", "audit/audit.md",
                             "train/summary.json")
             if storage.is_file(storage.join(output_dir, rel))]
    read = " ".join(str(h.link(output_dir, s, remote)) for s in sample.shards_read)
    return (h.table(["folder", "shards", "first shards", "summary"], rows)
            + "".join(f"<p>{h.link(output_dir, rel, remote)}</p>" for rel in extra)
            + (f"<p>Shards read for the row table: {read}</p>" if read else ""))
