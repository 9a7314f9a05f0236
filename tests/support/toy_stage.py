"""shout: a toy stage that writes each question in capitals, for docs/extending.md.

It needs no model: each row is handled on its own (a RowStage), a row without a question is
rejected, its index keeps each shout's length, and its summary reports their mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from palign.config import Config, EngineStageSection
from palign.stages.base import Context, Outcome, Row, RowStage, rejected


class ShoutSection(EngineStageSection):
    suffix: str = Field(default="!", description="What every shout ends with.")


class Shout(RowStage):
    name = "shout"
    description = "Each question in capitals (a toy stage, docs/extending.md)."
    Section = ShoutSection
    index_columns = ("length",)

    def needs_engine(self, cfg: Config) -> bool:
        return False  # no model: the actors start no engine

    async def process_row(self, row: Row, ctx: Context) -> Outcome:
        question = (row.get("question") or "").strip()
        if not question.endswith("?"):
            return rejected(row, "no question to shout")
        shout = question.upper() + ctx.section.suffix
        return Outcome(str(row["id"]), {**row, "shout": shout, "length": len(shout)})

    def index(self, record: Row) -> dict[str, Any]:
        return {"length": record["length"]}

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        lengths = columns.get("length", ())
        return {"mean_length": float(sum(lengths)) / len(lengths)} if len(lengths) else {}
