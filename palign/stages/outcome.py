"""What a stage makes of one row: a finished record, or a reject with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    id: str
    record: dict[str, Any] | None = None  # the output row, when the row went through
    reason: str | None = None  # why it was rejected, otherwise

    @property
    def ok(self) -> bool:
        return self.reason is None


def rejected(row: dict[str, Any], reason: str) -> Outcome:
    return Outcome(str(row.get("id")), None, reason)
