"""The run config: one YAML file, parsed into typed models before any work starts.

Unknown keys and bad values fail with the dotted path of the field (``truncate.threshold``).
Every field documents itself (``Field(description=...)``; ``palign validate --explain CONFIG``
prints them all); ``configs/demo.yaml`` shows them in use.
Engine settings live under ``engine:`` and can be overridden per stage under
``<stage>.engine:``; the two are merged before validation, so errors name the stage's path.

The parts: ``base`` (stage names, ``ConfigError`` and its message), ``sections`` (run, ray,
data, models, engine, output), ``stage_sections`` (generate, truncate, align, evaluate),
``train_section``, ``root`` (``Config``, reading and validating) and ``field_docs`` (``explain``).
"""

from palign.core.config.base import (
    ENGINE_STAGES,
    NAME_PATTERN,
    STAGES,
    ConfigError,
    format_problems,
)
from palign.core.config.field_docs import (
    REQUIRED,
    FieldDoc,
    config_models,
    explain,
    format_explain,
)
from palign.core.config.root import Config, load_config, parse_config
from palign.core.config.sections import (
    DataSection,
    EngineConfig,
    FieldNames,
    ModelsSection,
    OutputSection,
    ProblemColumns,
    ProblemSource,
    RaySection,
    ReplicaRange,
    RunSection,
)
from palign.core.config.stage_sections import (
    AlignSection,
    Benchmark,
    EvalModel,
    EvaluateSection,
    GenerateSection,
    SamplingConfig,
    TruncateSection,
)
from palign.core.config.train_section import LoraSection, TrainSection

__all__ = [
    "ENGINE_STAGES", "NAME_PATTERN", "REQUIRED", "STAGES", "AlignSection", "Benchmark",
    "Config", "ConfigError", "DataSection", "EngineConfig", "EvalModel",
    "EvaluateSection", "FieldDoc", "FieldNames", "GenerateSection", "LoraSection", "ModelsSection",
    "OutputSection", "ProblemColumns", "ProblemSource", "RaySection", "ReplicaRange",
    "RunSection", "SamplingConfig",
    "TrainSection", "TruncateSection", "config_models", "explain", "format_explain",
    "format_problems", "load_config", "parse_config",
]
