"""The run config: one YAML file, parsed into typed models before any work starts.

Unknown keys and bad values fail with the dotted path of the field (``truncate.threshold``).
Every field documents itself (``Field(description=...)``; ``palign validate --explain CONFIG``
prints them all); ``configs/demo.yaml`` shows them in use.
Engine settings live under ``engine:`` and can be overridden per stage under
``<stage>.engine:``; the two are merged before validation, so errors name the stage's path.

The parts: ``base`` (``ConfigError`` and its message), ``stages`` (the list of stages, each
named by its class's import path: the only import of ``palign.stages`` from here, at run
time), ``sections`` (run, ray, data, models, engine, output), ``stage_base`` (what the stages'
sections share: rejects, engine, sampling; each stage's own section lives in its stage module,
``palign.stages.truncate.TruncateSection``), ``root`` (``Config``, and ``config_model()``: it
with a section per stage of the list; reading and validating), ``merge`` (the one deep merge),
``paths`` (the one place local paths are made absolute), ``overrides`` (``--set``) and
``field_docs`` (``explain``).

It may import the standard library, pydantic, yaml and ``palign.common``; nothing else of palign
(checked by ``lint-imports``, contracts in ``pyproject.toml``): the stages' classes are found by
their import path, not by an import statement.
"""

from palign.config.base import (
    NAME_PATTERN,
    ConfigError,
    Strict,
    format_problems,
)
from palign.config.field_docs import (
    REQUIRED,
    FieldDoc,
    config_models,
    explain,
    format_explain,
)
from palign.config.root import Config, config_model, load_config, parse_config
from palign.config.sections import (
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
from palign.config.stage_base import (
    STAGE_ENGINE,
    EngineStageSection,
    SamplingConfig,
    StageSection,
)
from palign.config.stages import (
    engine_stage_names,
    registered,
    stage_class,
    stage_entries,
    stage_names,
    stage_path,
    stages_before,
)

__all__ = [
    "NAME_PATTERN", "REQUIRED", "STAGE_ENGINE",
    "Config", "ConfigError", "DataSection", "EngineConfig", "EngineStageSection",
    "FieldDoc", "FieldNames", "ModelsSection",
    "OutputSection", "ProblemColumns", "ProblemSource", "RaySection", "ReplicaRange",
    "RunSection", "SamplingConfig", "StageSection", "Strict",
    "config_model", "config_models", "explain", "format_explain",
    "engine_stage_names", "format_problems", "load_config", "parse_config", "registered",
    "stage_class", "stage_entries", "stage_names", "stage_path", "stages_before",
]
