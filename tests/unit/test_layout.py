"""The rules of the package's layout that import-linter cannot state (its contracts, in
pyproject.toml, keep the imports): modules a reader can hold, no test hook in production code,
the engine protocol called as declared, and every folder saying what it may import. Pure: reads
the source files, imports nothing of palign."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "palign"
MAX_LINES = 400
# getattr on an engine, a backend or a wrapped engine: a call the Engine protocol should declare
ENGINE_GETATTR = re.compile(r"getattr\(\s*[\w.]*(engine|backend|inner)\w*\s*,", re.I)


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_package_is_where_the_tests_expect_it():
    assert (PACKAGE / "__init__.py").is_file()
    assert len(_modules()) > 50


def test_no_module_is_over_400_lines():
    long = {_relative(p): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_no_test_hook_in_the_package():
    hooks = [_relative(p) for p in _modules() if "PALIGN_TEST" in p.read_text()]
    assert hooks == [], f"PALIGN_TEST named in {hooks}: a test brings its own engine or callback"


def test_the_engine_layer_calls_no_method_it_has_not_declared():
    """The stages call an engine through ``palign.engines.base.Engine`` only; the server and
    the guard call the backend through ``Backend``: no ``getattr`` probing for a method."""
    found = []
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ENGINE_GETATTR.search(line):
                found.append(f"{_relative(path)}:{n}: {line.strip()}")
    for name in ("server.py", "guard.py"):
        path = PACKAGE / "engines" / name
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "getattr(" in line:
                found.append(f"{_relative(path)}:{n}: {line.strip()}")
    assert found == []


def test_the_pattern_finds_getattr_on_an_engine():
    assert ENGINE_GETATTR.search('fn = getattr(self.engine, "admit", None)')
    assert ENGINE_GETATTR.search("getattr(ctx.engine, name)")
    assert ENGINE_GETATTR.search('getattr(self._inner, "agenerate")')
    assert not ENGINE_GETATTR.search('getattr(section, "engine", None)')
    assert not ENGINE_GETATTR.search("getattr(cfg, self.name)")


def test_every_package_says_what_it_may_import():
    packages = sorted(p for p in PACKAGE.glob("*/__init__.py"))
    assert {p.parent.name for p in packages} >= {
        "common", "method", "config", "data", "report", "engines", "stages", "runtime", "train"}
    silent = []
    for init in packages:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if not re.search(r"\bmay import\b", " ".join(doc.split())):
            silent.append(_relative(init))
    assert silent == [], f"package docstrings without a 'may import' sentence: {silent}"


def test_the_package_data_globs_name_files_that_exist():
    """An installed palign keeps its data files (the paper's reference table) only if the
    globs of ``[tool.setuptools.package-data]`` follow the files when they move."""
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["palign"]
    assert globs
    for pattern in globs:
        assert list(PACKAGE.glob(pattern)), f"package-data {pattern!r} matches no file"
    assert (PACKAGE / "report" / "references" / "paper.json").is_file()


def test_no_core_package_is_left():
    """No catch-all package is left: each folder says what it holds."""
    assert not (PACKAGE / "core").exists()
