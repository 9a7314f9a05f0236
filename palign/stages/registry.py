"""Every engine stage, by name (``palign.stages.definition``); the train stage runs on Ray Train
instead (``palign.train``)."""

from __future__ import annotations

from palign.stages.align import ALIGN
from palign.stages.definition import Stage
from palign.stages.evaluate import EVALUATE
from palign.stages.generate import GENERATE
from palign.stages.truncate import TRUNCATE

REGISTRY: dict[str, Stage] = {s.name: s for s in (GENERATE, TRUNCATE, ALIGN, EVALUATE)}
