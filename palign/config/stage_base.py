"""What the sections of the stages that process rows share: how much they may reject, their
engine, and the shape of a sampling block.

Each stage's own section lives beside its code, in its stage module (``palign.stages.truncate``
has ``TruncateSection``), and subclasses one of these; the config's ``config_model()`` adds one
field per stage of the list. A field declared here comes first in every section that inherits
it (``palign validate --explain`` prints them in that order).
"""

from __future__ import annotations

from pydantic import Field

from palign.config.base import Strict
from palign.config.sections import EngineConfig

STAGE_ENGINE = "This stage's engine settings, merged field by field over the top-level engine."


class StageSection(Strict):
    """How much a stage may reject before it fails (the share of all its rows), and how often a
    row may be in flight when its engine dies before it is rejected (kind ``system``)."""

    max_reject_share: float = Field(
        default=0.5, ge=0, le=1,
        description="The stage fails when more than this share of its rows is rejected.")
    max_row_attempts: int = Field(
        default=3, ge=1,
        description="Times a row may be in flight when its engine dies before it is rejected "
                    "(kind system).")


class EngineStageSection(StageSection):
    """A stage that serves a model: its ``engine`` is the top-level ``engine:`` with its own
    settings merged over it (``palign.config.root``), so an error names the stage's path."""

    engine: EngineConfig = Field(default=EngineConfig(), description=STAGE_ENGINE)


class SamplingConfig(Strict):
    max_tokens: int | None = Field(
        default=1024, ge=1,
        description="Most tokens generated per output; null: up to the context (the output "
                    "may take whatever the prompt leaves of the engine's max_model_len, as the "
                    "paper's evaluation does).")
    temperature: float = Field(
        default=0.6, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(
        default=0.9, gt=0, le=1, description="Nucleus sampling: the probability mass kept.")
    repetition_penalty: float = Field(
        default=1.05, gt=0, description="Penalty on tokens already in the text; 1 is none.")
    seed: int | None = Field(
        default=0,
        description="Sampling seed (request i of a call uses seed + i); null: unseeded.")
