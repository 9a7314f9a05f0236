"""The run report (``palign.report.run_report``) on a small synthetic run folder, read back with
``html.parser``: every section, the escaping of what rows hold, the CoT split at its prefix
offset, a page that loads nothing, and the halving of the row table past its size bound."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from report_runs import SCRIPT, small_run

from palign.data.shards import ShardWriter
from palign.report.rowsample import choose_shards, quotas, reason_group
from palign.report.run_report import REPORT_HTML, build_run_report, write_run_report

SECTIONS = ("overview", "stages", "rejects", "distributions", "rows", "evaluation", "audit",
            "files")


class Page(HTMLParser):
    """The parts of the page the tests look at: section ids, tags, attributes, and each row
    card's kept and cut CoT text (the omitted-middle notes left out)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.kept: dict[str, str] = {}
        self.cut: dict[str, str] = {}
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._row: str | None = None
        self._stack: list[str] = []  # the open classed elements inside a row's CoT

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "details":
            self._row = a.get("data-id")
        if tag in ("mark", "span"):
            self._stack.append(a.get("class", ""))
        if tag in ("script", "style"):
            self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("mark", "span", "script", "style") and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        where = self._stack[-1] if self._stack else ""
        if where == "script":
            self.scripts.append(data)
        elif where == "style":
            self.styles.append(data)
        elif self._row and where == "kept":
            self.kept[self._row] = self.kept.get(self._row, "") + data
        elif self._row and where == "cut" and (len(self._stack) < 2 or self._stack[-2] != "gap"):
            self.cut[self._row] = self.cut.get(self._row, "") + data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    records = small_run(root)
    report = build_run_report(root)
    page = Page()
    page.feed(report.html)
    return root, records, report, page


def test_every_section_is_there(run):
    _, records, report, page = run
    for section in SECTIONS:
        assert section in page.ids, section
    assert report.rows_shown == len(records) and report.rejects_shown == 1
    assert report.histograms == {"prefix_ratio": 6, "sentence_ratio": 6, "probes": 6,
                                 "verify_moves": 1, "continuation_tokens": 5}
    assert 'data:image/png;base64,' in report.html  # evaluate's PNG, inlined
    assert "math &lt;i&gt;" in report.html and "pass@2" in report.html
    assert "12.5" in report.html and "_SUMMARY.json" in report.html  # truncate's summary


def test_text_from_rows_is_escaped(run):
    _, _, report, page = run
    assert len(page.scripts) == 1  # the page's own, not the CoT's
    assert page.tags.count("script") == 1 and "img" not in [
        t for t, k, v in page.attrs if k == "onerror"]
    assert "&lt;script&gt;alert(" in report.html
    assert SCRIPT not in report.html
    assert "<b>boom</b>" not in report.html and "&lt;b&gt;boom" in report.html
    assert not any(k.startswith("on") for _, k, _ in page.attrs)


def test_the_cot_splits_at_the_prefix_offset(run):
    _, records, _, page = run
    assert set(page.kept) == set(records)
    for rid, rec in records.items():
        offset = rec["prefix_offset"]
        assert page.kept[rid] == rec["cot"][:offset]
        assert page.cut.get(rid, "") == rec["cot"][offset:]
    assert any(page.cut.values()) and any(r["prefix_offset"] == len(r["cot"])
                                          for r in records.values())


def test_probe_path_continuation_and_grade_are_shown(run):
    _, records, report, _ = run
    first = records["curve-00"]
    path = " -&gt; ".join(f"k={p['k']}{'*' if p['k'] == first['sentences_kept'] else ''} "
                          f"P={p['score']:.2f} {p['verdict']}" for p in first["probes"])
    assert path in report.html
    assert "[... " in report.html  # the long continuation clipped
    assert "predicted_answer: 7" in report.html
    moved = records["curve-03"]["verify"]
    assert (f"search k={moved['search_k']}; k={moved['search_k']} 1/4 -&gt; "
            f"k={moved['final_k']} 3/4; final k={moved['final_k']} (passed") in report.html


def test_the_page_loads_nothing(run):
    _, _, report, page = run
    assert "link" not in page.tags and "iframe" not in page.tags
    for tag, name, value in page.attrs:
        if name in ("src", "href"):
            assert not re.match(r"^\s*(https?:|//|javascript:)", value, re.I), (tag, value)
            assert value.startswith(("data:image/png;base64,", "#")) or not re.match(
                r"^[a-z]+:", value), value
    assert "@import" not in "".join(page.styles) and "url(" not in "".join(page.styles)
    assert "default-src 'none'" in report.html  # the CSP forbids any other source


def test_rejects_are_grouped_by_reason(run):
    _, _, report, _ = run
    assert "judge at k=#" in report.html
    assert reason_group("judge at k=17: timeout") == "judge at k=#"
    assert reason_group("wrong answer: predicted '3'") == "wrong answer"


def test_over_the_size_bound_the_rows_are_halved(run):
    root, records, report, _ = run
    smaller = build_run_report(root, max_bytes=len(report.html.encode()) - 1)
    assert smaller.halved == 1 and smaller.rows_shown == len(records) // 2
    assert "halved 1 time" in smaller.html


def test_write_run_report_writes_the_file(run):
    root, _, _, _ = run
    path = write_run_report(root)
    assert path == root / REPORT_HTML and path.read_text().startswith("<!DOCTYPE html>")


def test_a_folder_without_rows_still_makes_a_page(tmp_path):
    report = build_run_report(tmp_path)
    page = Page()
    page.feed(report.html)
    assert all(s in page.ids for s in SECTIONS) and report.rows_shown == 0


def test_unreadable_files_cost_only_their_own_part(tmp_path):
    records = small_run(tmp_path)
    shard = sorted((tmp_path / "align").glob("part-*.jsonl"))[0]
    shard.write_text("not json\n")
    (tmp_path / "truncate" / "_SUMMARY.json").write_text("{not json")
    report = build_run_report(tmp_path)
    page = Page()
    page.feed(report.html)
    assert all(s in page.ids for s in SECTIONS)
    assert report.rows_shown == len(records) - 2  # the two rows of the shard left out
    assert f"Shard left out (unreadable): align/{shard.name}" in report.html
    assert "truncate</td><td>done</td><td>-</td><td class=\"n\">6</td>" in report.html
    for index in (tmp_path / "truncate" / "rejects" / "_index").glob("part-*"):
        index.write_bytes(b"not parquet")
    (tmp_path / "evaluate" / "results.json").write_text("[]")
    report = build_run_report(tmp_path)
    page = Page()
    page.feed(report.html)
    assert all(s in page.ids for s in SECTIONS)
    assert any(n.startswith("the rejects left out") for n in report.notes), report.notes
    assert "No readable evaluate/results.json" in report.html


def test_a_run_without_truncate_shows_its_generated_rows(tmp_path):
    rows = [{"id": f"g{i}", "question": f"q{i}?", "cot": f"Think {i}. Done."} for i in range(5)]
    ShardWriter(tmp_path / "generate", shard_rows=2).write(rows)
    report = build_run_report(tmp_path)
    assert report.rows_shown == 5 and report.histograms == {}
    assert 'data-kind="row"' in report.html and "Think 3. Done." in report.html
    assert 'class="kept"' not in report.html


def test_quotas_and_shards_give_rare_kinds_their_share():
    assert quotas({"right": 1000, "wrong": 3, "unchecked": 50}, 30) == {
        "right": 13, "wrong": 3, "unchecked": 14}
    per_shard = {f"s{i}": {"right": 100} for i in range(20)}
    per_shard["s7"] = {"right": 90, "wrong": 10}
    chosen = choose_shards(per_shard, {"right": 20, "wrong": 10}, 32)
    assert chosen[0] == "s7" and len(chosen) == 1
    assert len(choose_shards({f"s{i}": {"a": 1} for i in range(50)}, {"a": 40}, 32)) == 32
