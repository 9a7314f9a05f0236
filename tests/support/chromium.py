"""Headless Chromium for the run report's render tests: the page's DOM after its script ran,
and a screenshot. Tests skip, saying how to install it, on a machine without ``chromium``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MISSING = ("headless Chromium not found: apt-get install -y --no-install-recommends chromium "
           "(Debian; .ci/run installs it)")


def chromium() -> str:
    """The ``chromium`` executable; skips the test without one."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip(MISSING)
    return found


def _run(page: Path, profile: Path, *extra: str,
         timeout: float = 60) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers' /dev/shm is small.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(page: Path, profile: Path, timeout: float = 60) -> str:
    """The DOM of ``page`` once loaded (its inline scripts have run), as HTML."""
    done = _run(page, profile, "--dump-dom", timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, png: Path, profile: Path, size: str = "1400,2000",
               timeout: float = 60) -> str:
    """A PNG of ``page`` at ``size``; returns Chromium's log (``--enable-logging=stderr``:
    the page's console errors are in it)."""
    done = _run(page, profile, f"--screenshot={png}", f"--window-size={size}",
                "--enable-logging=stderr", "--v=0", timeout=timeout)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return done.stderr
