"""What a stage makes of one row: a finished record, or a reject with its reason and kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from palign.core.failures import ROW


@dataclass
class Outcome:
    id: str
    record: dict[str, Any] | None = None  # the output row, when the row went through
    reason: str | None = None  # why it was rejected, otherwise
    kind: str = ROW  # whose fault the reject is: "row" or "system" (see palign.core.failures)

    @property
    def ok(self) -> bool:
        return self.reason is None


def rejected(row: dict[str, Any], reason: str, kind: str = ROW) -> Outcome:
    return Outcome(str(row.get("id")), None, reason, kind)
