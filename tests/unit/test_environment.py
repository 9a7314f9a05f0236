"""The suite's hard dependencies: each must import, and a broken one fails the suite (a test
never skips because vLLM, math-verify or datasets is missing)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARD = ("vllm", "math_verify", "datasets", "deepspeed", "ray", "torch", "transformers")


@pytest.mark.parametrize("module", HARD)
def test_hard_dependency_imports(module):
    importlib.import_module(module)


def test_a_broken_vllm_fails_the_suite(tmp_path):
    """A vLLM that cannot import (as a half-failed install leaves it) fails the tests that need
    it: they error, none is skipped."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('vllm broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    here = Path(__file__)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{here}::test_hard_dependency_imports[vllm]"],
        env=env, capture_output=True, text=True, timeout=300, cwd=here.parents[2])
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 failed" in run.stdout and "skipped" not in run.stdout
    assert "vllm broken on purpose" in run.stdout
