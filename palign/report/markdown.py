"""The Markdown pieces the results and comparison tables share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The Markdown cell for a number that does not exist (a k beyond a model's n, no token counts).
MISSING = "-"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def num(value: Any, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def pass_keys(metric_dicts: Iterable[Mapping[str, Any]]) -> list[str]:
    ks = {int(k.split("@")[1]) for m in metric_dicts for k in m if k.startswith("pass@")}
    return [f"pass@{k}" for k in sorted(ks)]
