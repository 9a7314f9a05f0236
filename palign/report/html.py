"""The run report's HTML: the page around the sections, tables, and one sampled row's card.

Every piece of text that came from a run (ids, questions, CoTs, reasons, model names, file
names) goes through ``esc`` or ``table``; only the markup built here is trusted (``Markup``).
The page loads nothing: its style and script are inline, its charts inline SVG, its images
``data:`` URIs, and a Content-Security-Policy forbids any other source, so it opens from a
disk, a mail or a bucket the same way, with no server and no network.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

KEPT_HEAD, KEPT_TAIL, CUT_HEAD = 800, 400, 600  # characters of a CoT shown (kept / cut part)
QUESTION_CHARS, CONTINUATION_CHARS, REASON_CHARS = 600, 1500, 1000


class Markup(str):
    """HTML built here: ``table`` puts it in a cell as it is."""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, spec: str = ",.3g") -> str:
    """A figure for a cell: '-' when missing, thousands apart, floats to 3 figures."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def clipped(text: str, head: int, tail: int = 0) -> Markup:
    """``text`` escaped; past ``head + tail`` characters its middle is left out, and a grey
    note says how much."""
    if len(text) <= head + tail:
        return Markup(esc(text))
    gap = f'<span class="gap">[... {len(text) - head - tail:,} characters ...]</span>'
    return Markup(esc(text[:head]) + gap + (esc(text[len(text) - tail:]) if tail else ""))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> Markup:
    """A table of escaped cells (a ``Markup`` cell goes in as it is; numbers right-aligned)."""
    def cell(v: Any) -> str:
        if isinstance(v, Markup):
            return f"<td>{v}</td>"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="n">{esc(fmt(v))}</td>'
        return f"<td>{esc(fmt(v))}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return Markup(f'<table class="{esc(cls)}">{thead}<tbody>{body}</tbody></table>')


def link(output_dir: str, rel: str, remote: bool) -> Markup:
    """A file of the run: a relative link beside the report, or on object storage (which a
    browser cannot open) its URI as text."""
    if remote:
        return Markup(f"<code>{esc(output_dir.rstrip('/') + '/' + rel)}</code>")
    return Markup(f'<a href="{esc(quote(rel))}"><code>{esc(rel)}</code></a>')


def split_cot(cot: str, offset: int) -> Markup:
    """The CoT with its kept part (before ``offset``) marked and its cut part greyed, each
    clipped: the kept part's start and end, the cut part's start."""
    kept, cut = cot[:offset], cot[offset:]
    if len(kept) > KEPT_HEAD + KEPT_TAIL:
        kept_html = (f'<mark class="kept">{esc(kept[:KEPT_HEAD])}</mark>'
                     f'<span class="gap">[... {len(kept) - KEPT_HEAD - KEPT_TAIL:,} characters '
                     f'kept ...]</span><mark class="kept">{esc(kept[-KEPT_TAIL:])}</mark>')
    else:
        kept_html = f'<mark class="kept">{esc(kept)}</mark>'
    cut_html = f'<span class="cut">{clipped(cut, CUT_HEAD)}</span>' if cut else ""
    return Markup(f'<pre class="cot">{kept_html}{cut_html}</pre>')


def probe_path(probes: Any, chosen: Any) -> str:
    """``k=17 P=0.91 ENOUGH -> k=8 P=0.42 NOT_ENOUGH``, the chosen k starred."""
    steps = []
    for p in probes if isinstance(probes, list) else []:
        if not isinstance(p, Mapping):
            continue
        score = p.get("score")
        star = "*" if p.get("k") == chosen else ""
        steps.append(f"k={p.get('k')}{star}"
                     + (f" P={score:.2f}" if isinstance(score, (int, float)) else "")
                     + f" {p.get('verdict', '')}")
    return " -> ".join(steps)


def verify_path(verify: Any) -> str:
    """What verified prefixes did (``truncate.verify``): the moves and where it ended."""
    if not isinstance(verify, Mapping):
        return ""
    if "skipped" in verify:
        return f"skipped: {verify['skipped']}"
    moves = " -> ".join(f"k={m.get('k')} {m.get('passed')}/{m.get('of')}"
                        for m in verify.get("moves") or [] if isinstance(m, Mapping))
    end = "passed" if verify.get("passed") else "not passed"
    return (f"search k={verify.get('search_k')}; {moves or 'no rollouts'}; "
            f"final k={verify.get('final_k')} ({end}, at least {verify.get('min_pass')} of "
            f"{verify.get('samples')} must pass)")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _part(title: str, body: str) -> str:
    return f'<div class="part"><b>{esc(title)}</b>{body}</div>' if body else ""


def row_card(row: Mapping[str, Any], kind: str, shard: Markup, open_: bool = False) -> str:
    """One sampled record as a ``<details>``: its question, the CoT split at its prefix
    offset, the probe path with scores, the verify moves, the continuation and its grade."""
    cot = row.get("cot") if isinstance(row.get("cot"), str) else ""
    offset = row.get("prefix_offset")
    ratio, probes = _number(row.get("prefix_ratio")), row.get("probes")
    n_probes = len(probes) if isinstance(probes, list) else None
    facts = [f"kept {ratio:.0%}" if ratio is not None else "",
             f"{row.get('sentences_kept')}/{row.get('sentences_total')} sentences"
             if row.get("sentences_total") else "",
             f"{n_probes} probes" if n_probes is not None else ""]
    summary = (f'<code>{esc(row.get("id"))}</code> <span class="badge '
               f'{esc(kind.replace(" ", "-"))}">{esc(kind)}</span> '
               f'{esc(" · ".join(f for f in facts if f))}')
    if isinstance(offset, int) and cot:
        cot_html = split_cot(cot, offset)
    else:
        cot_html = Markup(f'<pre class="cot">{clipped(cot, KEPT_HEAD, KEPT_TAIL)}</pre>') \
            if cot else ""
    grade = [f"{k}: {row.get(k)}" for k in ("answer_correct", "predicted_answer", "gold_answer",
                                            "grade_status", "answer_source",
                                            "continuation_tokens", "continuation_finish")
             if k in row]
    cont = row.get("continuation")
    body = "".join([
        _part("question", f"<p>{clipped(str(row.get('question') or ''), QUESTION_CHARS)}</p>"),
        _part("CoT (kept part marked, cut part grey)" if isinstance(offset, int) else "CoT",
              cot_html),
        _part("probes", f'<p class="mono">{esc(probe_path(probes, row.get("sentences_kept")))}'
                        "</p>" if n_probes else ""),
        _part("verify", f'<p class="mono">{esc(verify_path(row.get("verify")))}</p>'
              if row.get("verify") else ""),
        _part("continuation", f'<pre class="cont">{clipped(cont, CONTINUATION_CHARS)}</pre>'
              if isinstance(cont, str) else ""),
        _part("grade", f'<p class="mono">{esc(" · ".join(grade))}</p>' if grade else ""),
        _part("shard", f"<p>{shard}</p>")])
    return (f'<details class="row"{" open" if open_ else ""} data-id="{esc(row.get("id"))}" '
            f'data-kind="{esc(kind)}" data-ratio="{"" if ratio is None else f"{ratio:.4f}"}" '
            f'data-probes="{"" if n_probes is None else n_probes}">'
            f"<summary>{summary}</summary>{body}</details>")


def reject_card(rej: Mapping[str, Any], shard: Markup) -> str:
    """One sampled reject: why (whole, clipped), whose fault, and the row as it came."""
    row = rej.get("row") if isinstance(rej.get("row"), Mapping) else {}
    cot = row.get("cot") if isinstance(row.get("cot"), str) else ""
    reason = str(rej.get("reason"))
    summary = (f'<code>{esc(rej.get("id"))}</code> <span class="badge reject">reject</span> '
               f'{clipped(reason, 160)}')
    body = "".join([
        _part("reason", f'<p class="mono">{clipped(reason, REASON_CHARS)}</p>'),
        _part("stage and kind", f"<p>{esc(rej.get('stage'))} · {esc(rej.get('kind'))}</p>"),
        _part("question", f"<p>{clipped(str(row.get('question') or ''), QUESTION_CHARS)}</p>"
              if row.get("question") else ""),
        _part("CoT", f'<pre class="cot">{clipped(cot, KEPT_HEAD, KEPT_TAIL)}</pre>'
              if cot else ""),
        _part("shard", f"<p>{shard}</p>")])
    return (f'<details class="row" data-id="{esc(rej.get("id"))}" data-kind="reject" '
            f'data-ratio="" data-probes=""><summary>{summary}</summary>{body}</details>')


def row_controls(kinds: Sequence[str]) -> str:
    options = "".join(f'<option value="{esc(k)}">{esc(k)}</option>' for k in kinds)
    return ('<div class="controls"><input id="row-filter" type="search" '
            'placeholder="filter: id or any text"> <select id="row-kind"><option value="">'
            f'every kind</option>{options}</select> <select id="row-sort">'
            '<option value="">sample order</option><option value="ratio">prefix ratio</option>'
            '<option value="probes">probes</option><option value="id">id</option></select> '
            '<span id="row-count"></span></div>')


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;
color:#1d2330}
h1{margin:18px 0 4px}h2{border-bottom:1px solid #ccd;padding-bottom:3px;margin-top:30px}
nav a{margin-right:12px}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #d7dbe3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#5b6475}.warn{color:#9a3b00;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fafbfd;border:1px solid #e3e6ee}
.chart rect{fill:#4c72b0}.chart rect:hover{fill:#dd8452}.chart text{font-size:11px;fill:#333}
.chart .axis{stroke:#888}.chart .y{text-anchor:end}.chart .x1{text-anchor:end}
.chart .xl{text-anchor:middle}.chart .t{font-weight:600;font-size:12px}
details.row{border:1px solid #d7dbe3;border-radius:4px;margin:4px 0;padding:2px 8px}
details.row[open]{background:#fcfcfe}summary{cursor:pointer}
.badge{border-radius:3px;padding:0 5px;font-size:12px;background:#e3e6ee}
.badge.right,.badge.enough{background:#cdebd3}.badge.wrong,.badge.reject{background:#f6cfcf}
.badge.unchecked,.badge.not-enough{background:#f3e6c4}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font-size:12.5px}
mark.kept{background:#d8f0d0}.cut{color:#9aa1ad}.gap{color:#a05a00;font-style:italic}
.mono{font-family:ui-monospace,monospace;font-size:12.5px}.part{margin:6px 0}
.controls{margin:8px 0}.controls input{width:260px}img.plot{max-width:100%}
"""

SCRIPT = """
(function(){
  var list=document.getElementById('row-list');
  if(list){
    var rows=Array.prototype.slice.call(list.querySelectorAll('details.row'));
    var order=rows.slice();
    var q=document.getElementById('row-filter'),k=document.getElementById('row-kind'),
        s=document.getElementById('row-sort'),c=document.getElementById('row-count');
    var text=rows.map(function(r){return r.textContent.toLowerCase();});
    var apply=function(){
      var t=q.value.toLowerCase(),want=k.value,shown=0;
      rows.forEach(function(r,i){
        var ok=(!want||r.dataset.kind===want)&&(!t||text[i].indexOf(t)>=0);
        r.hidden=!ok;if(ok){shown++;}
      });
      c.textContent=shown+' of '+rows.length+' rows shown';
    };
    var num=function(v){return v===''?Infinity:parseFloat(v);};
    var sort=function(){
      var key=s.value,sorted=order.slice();
      if(key==='id'){sorted.sort(function(a,b){return a.dataset.id<b.dataset.id?-1:
        a.dataset.id>b.dataset.id?1:0;});}
      else if(key){sorted.sort(function(a,b){return num(a.dataset[key])-num(b.dataset[key]);});}
      sorted.forEach(function(r){list.appendChild(r);});
    };
    q.addEventListener('input',apply);k.addEventListener('change',apply);
    s.addEventListener('change',sort);apply();
  }
  document.body.dataset.ready='1';
})();
"""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")


def page(title: str, nav: Sequence[tuple[str, str]], sections: Sequence[tuple[str, str, str]]
         ) -> str:
    """The whole document: ``sections`` are (id, heading, body HTML); ``nav`` (id, label)."""
    links = "".join(f'<a href="#{esc(i)}">{esc(label)}</a>' for i, label in nav)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{b}</section>'
                   for i, h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><nav>{links}</nav>{body}"
            f"<script>{SCRIPT}</script></body></html>\n")
