"""The run report renders in a real browser: headless Chromium runs the page's script (it
sets ``data-ready="1"`` on the body when its filter and sorting are in place), logs no
uncaught error, and draws a page that is not blank. Skipped, saying how to install it, on a
machine without ``chromium``."""

from __future__ import annotations

import pytest
from chromium import dump_dom, screenshot
from report_runs import small_run

from palign.report.run_report import write_run_report

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_the_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    run.mkdir()
    records = small_run(run)
    path = write_run_report(run)
    dom = dump_dom(path, tmp_path / "profile-dom")
    assert 'data-ready="1"' in dom
    assert f"{len(records) + 1} of {len(records) + 1} rows shown" in dom  # the script counted
    png = tmp_path / "report.png"
    log = screenshot(path, png, tmp_path / "profile-shot")
    assert "Uncaught" not in log, [ln for ln in log.splitlines() if "Uncaught" in ln]
    colors = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # None: more colours than that
