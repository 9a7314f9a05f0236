"""The whole config and how it is read: a YAML file (which may extend another), merged with
overrides and the top-level engine, validated into a ``Config``.

``Config`` holds the run-wide sections and what a run asks of them; the sections of the stages
come from the list of stages (``palign.config.stages``): ``config_model()`` builds the
model with one field per stage (its class's ``Section``), and every whole config is validated
with it. A stage added to the list adds its section; nothing here names a stage.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from palign.common import uri
from palign.config.base import ConfigError, Strict, format_problems
from palign.config.merge import deep_merge
from palign.config.overrides import apply_overrides
from palign.config.sections import (
    DataSection,
    EngineConfig,
    ModelsSection,
    OutputSection,
    RaySection,
    RunSection,
)
from palign.config.stages import engine_stage_names, stage_class, stage_entries

# The fewest tokens any stage's prompt takes (chat template, instruction, a short question):
# an output budget must leave at least this much of the context.
MIN_PROMPT_TOKENS = 64

# The last section, after the stages' (config_model() places it there, so it prints last).
_OUTPUT = Field(default=OutputSection(), description="How stages write their shards.")


class Config(Strict):
    """The run-wide sections (run, ray, data, models, engine, output) and the checks across
    sections. A config to validate is ``config_model()``, this class with a field per stage
    (``cfg.truncate``); type hints name this class."""

    run: RunSection = Field(
        default=RunSection(), description="The run: its name, output folder and stages.")
    ray: RaySection = Field(
        default=RaySection(), description="Where and how Ray runs.")
    data: DataSection = Field(description="The problems to distil from.")
    models: ModelsSection = Field(description="The student, teacher and judge models.")
    engine: EngineConfig = Field(
        default=EngineConfig(),
        description="Engine defaults for every stage; each stage's engine overrides them.")

    if TYPE_CHECKING:  # fields config_model() adds: output, and a section per stage
        output: OutputSection

        def __getattr__(self, stage: str) -> Any: ...

    @model_validator(mode="after")
    def _models_present(self) -> Config:
        """What each stage the run executes needs of the rest (``Stage.check``: generate a
        teacher when the data has no CoT, evaluate a benchmark)."""
        problems = [p for stage in self.run.stages for p in stage_class(stage)().check(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _engines_fit_their_stages(self) -> Config:
        """Each stage's engine, whether the run executes it or not (the top-level ``engine:``
        reaches them all): its fields agree (``EngineConfig.problems``), and a remote endpoint
        serves only a stage that asks its engine for chat completions alone
        (``Stage.remote_engine``)."""
        stages = engine_stage_names()
        remote_ok = [s for s in stages if stage_class(s).remote_engine]
        problems = []
        for stage in stages:
            engine = getattr(self, stage).engine
            problems += engine.problems(f"{stage}.engine")
            if engine.is_remote() and stage not in remote_ok:
                problems.append(
                    f"{stage}.engine.backend: {engine.backend} serves {' and '.join(remote_ok)} "
                    "only: a chat endpoint gives neither the judge's exact label "
                    "log-probabilities nor a continuation of an assistant prefix (use vllm or "
                    "transformers here, and set openai per stage, not in the top-level engine)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _outputs_fit_the_context(self) -> Config:
        """Every engine stage this run executes must leave room in its context for a prompt
        after its output budget (``Stage.output_budget``), or every row would be rejected:
        caught here, naming both fields. A stage the run does not execute keeps its defaults
        unchecked."""
        problems = []
        for stage in self.run.stages:
            section = getattr(self, stage)
            budget = stage_class(stage)().output_budget(section)
            if budget is None:
                continue
            field, new = budget
            context = section.engine.max_model_len
            if new is not None and new + MIN_PROMPT_TOKENS > context:
                problems.append(
                    f"{stage}.{field}: {new} new tokens leave {context - new} of "
                    f"{stage}.engine.max_model_len ({context}) for the prompt, under the "
                    f"{MIN_PROMPT_TOKENS} the shortest prompt takes: raise max_model_len, lower "
                    "max_tokens, or set it to null (up to the context)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # The model is built at run time, so pickle cannot find it by name: a copy is rebuilt
        # from the list of stages of the process that loads it (the same, for the built-ins).
        return _blank, (), self.__getstate__()

    @property
    def judge_model(self) -> str:
        return self.models.judge or self.models.student

    def stage_dir(self, stage: str) -> str:
        """``<output_dir>/<stage>``: a local path or a URI (``palign.common.uri``)."""
        return uri.join(self.run.output_dir, stage)

    def trained_model_dir(self) -> str:
        """Where train exports the student: ``<output_dir>/train/model``, absolute (a path or a
        URI); what evaluate's ``trained`` model is."""
        return uri.join(uri.absolute(self.stage_dir("train")), "model")

    def trained_adapter_dir(self) -> str:
        """Where a LoRA run (``train.lora``) also writes its adapter in PEFT's format:
        ``<output_dir>/train/adapter``, absolute; evaluate's ``adapter`` model."""
        return uri.join(uri.absolute(self.stage_dir("train")), "adapter")

    def template_kwargs_for(self, model: str) -> dict[str, Any]:
        """``models.chat_template_kwargs`` where ``model`` is the student (as named, its
        trained export or adapter, or the judge when no other judge is set), else none: a
        teacher or another model keeps its own template's defaults."""
        student = {self.models.student, self.trained_model_dir(), self.trained_adapter_dir()}
        return dict(self.models.chat_template_kwargs) if model in student else {}


def config_model() -> type[Config]:
    """``Config`` with a section per stage of the list, in the list's order, then ``output``:
    the model every whole config is validated with. Built once per list (a test that registers
    a stage gets a model with its section, and today's again once it is gone)."""
    return _built(stage_entries())


@cache
def _built(entries: tuple[tuple[str, str], ...]) -> type[Config]:
    stages: dict[str, Any] = {}
    for name, _ in entries:
        cls = stage_class(name)
        stages[name] = (cls.Section, Field(default_factory=cls.Section,
                                           description=cls.description))
    return create_model("Config", __base__=Config, __module__=__name__, **stages,
                        output=(OutputSection, _OUTPUT))


def _blank() -> Config:
    model = config_model()
    return model.__new__(model)


def _merge_engine(raw: dict[str, Any]) -> dict[str, Any]:
    """Give each stage the top-level engine settings, its own merged over them
    (``deep_merge``: ``replicas`` and ``engine_kwargs`` key by key, down to a mapping inside
    ``engine_kwargs``)."""
    base = raw.get("engine") or {}
    if not isinstance(base, dict):
        return raw
    merged = dict(raw)
    for stage in engine_stage_names():
        section = raw.get(stage)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            continue
        own = section.get("engine") or {}
        if not isinstance(own, dict):
            continue
        merged[stage] = {**section, "engine": deep_merge(base, own)}
    return merged


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where, msg = ".".join(str(p) for p in e["loc"]), e["msg"]
        if not where and e["type"] == "value_error":
            # a check across sections: its message names each field itself, one per "; "
            lines += msg.removeprefix("Value error, ").split("; ")
        else:
            lines.append(f"{where or '(top level)'}: {msg}")
    return format_problems(lines)


def parse_config(raw: Any) -> Config:
    """Validate a config given as a mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(format_problems(["(top level): expected a mapping of sections"]))
    try:
        return config_model().model_validate(_merge_engine(raw))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` maps dotted paths to values.

    A config may start from another with ``extends: <path relative to it>``: mappings are
    merged key by key (this file wins), anything else (lists included) is replaced.
    """
    raw = _read_yaml(Path(path), seen=())
    if not overrides:
        return parse_config(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return parse_config(raw)  # fails: a config is a mapping
    apply_overrides(raw, overrides, config_model())
    try:
        return parse_config(raw)
    except ConfigError as err:  # a value given by --set: say so where its field is named
        marks = {f"  {d.strip()}:": f" (set by --set {d.strip()})" for d in overrides}
        raise ConfigError("\n".join(
            line + next((m for start, m in marks.items() if line.startswith(start)), "")
            for line in str(err).split("\n"))) from None


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> Any:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    base_ref = raw.pop("extends")
    if not isinstance(base_ref, str):
        raise ConfigError(f"invalid config {path}:\n  extends: expected a path")
    base_path = (path.parent / base_ref).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"invalid config {path}:\n  extends: {base_ref} extends itself")
    base = _read_yaml(base_path, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise ConfigError(f"invalid config {base_path}: expected a mapping of sections")
    return deep_merge(base, raw)
