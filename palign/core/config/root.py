"""The whole config and how it is read: a YAML file (which may extend another), merged with
overrides and the top-level engine, validated into a ``Config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from palign.core.config.base import ENGINE_STAGES, ConfigError, Strict, format_problems
from palign.core.config.overrides import apply_overrides
from palign.core.config.sections import (
    DataSection,
    EngineConfig,
    ModelsSection,
    OutputSection,
    RaySection,
    RunSection,
)
from palign.core.config.stage_sections import (
    AlignSection,
    EvaluateSection,
    GenerateSection,
    TruncateSection,
)
from palign.core.config.train_section import TrainSection

# The fewest tokens any stage's prompt takes (chat template, instruction, a short question):
# an output budget must leave at least this much of the context.
MIN_PROMPT_TOKENS = 64


class Config(Strict):
    run: RunSection = Field(
        default=RunSection(), description="The run: its name, output folder and stages.")
    ray: RaySection = Field(
        default=RaySection(), description="Where and how Ray runs.")
    data: DataSection = Field(description="The problems to distil from.")
    models: ModelsSection = Field(description="The student, teacher and judge models.")
    engine: EngineConfig = Field(
        default=EngineConfig(),
        description="Engine defaults for every stage; each stage's engine overrides them.")
    generate: GenerateSection = Field(
        default=GenerateSection(),
        description="The teacher writes a CoT for every row without one.")
    truncate: TruncateSection = Field(
        default=TruncateSection(),
        description="The prefix search: the shortest CoT prefix the judge calls enough.")
    align: AlignSection = Field(
        default=AlignSection(),
        description="The student continues from the prefix; its answer is graded.")
    train: TrainSection = Field(
        default=TrainSection(),
        description="Student SFT on Ray Train with DeepSpeed ZeRO.")
    evaluate: EvaluateSection = Field(
        default=EvaluateSection(),
        description="Sampled answers of each model under test to each benchmark "
                    "problem, graded.")
    output: OutputSection = Field(
        default=OutputSection(), description="How stages write their shards.")

    @model_validator(mode="after")
    def _models_present(self) -> Config:
        no_cot = self.data.fields.cot is None
        if "generate" in self.run.stages and no_cot and not self.models.teacher:
            raise ValueError("models.teacher: required when the data has no CoT field")
        if "evaluate" in self.run.stages and not self.evaluate.benchmarks:
            raise ValueError("evaluate.benchmarks: list at least one benchmark to evaluate on")
        return self

    @model_validator(mode="after")
    def _outputs_fit_the_context(self) -> Config:
        """Every engine stage this run executes must leave room in its context for a prompt
        after its output budget, or every row would be rejected: caught here, naming both
        fields. A stage the run does not execute keeps its defaults unchecked."""
        budgets = [("generate", "sampling.max_tokens", self.generate.sampling.max_tokens),
                   ("align", "sampling.max_tokens", self.align.sampling.max_tokens),
                   ("evaluate", "sampling.max_tokens", self.evaluate.sampling.max_tokens),
                   ("truncate", "judge_max_tokens",
                    self.truncate.judge_max_tokens if self.truncate.verdict == "generate" else 1)]
        problems = []
        for stage, field, new in budgets:
            if stage not in self.run.stages:
                continue
            context = getattr(self, stage).engine.max_model_len
            if new is not None and new + MIN_PROMPT_TOKENS > context:
                problems.append(
                    f"{stage}.{field}: {new} new tokens leave {context - new} of "
                    f"{stage}.engine.max_model_len ({context}) for the prompt, under the "
                    f"{MIN_PROMPT_TOKENS} the shortest prompt takes: raise max_model_len, lower "
                    "max_tokens, or set it to null (up to the context)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def judge_model(self) -> str:
        return self.models.judge or self.models.student

    def stage_dir(self, stage: str) -> str:
        """``<output_dir>/<stage>``: a local path or a URI (``palign.core.storage``)."""
        from palign.core import storage

        return storage.join(self.run.output_dir, stage)

    def trained_model_dir(self) -> str:
        """Where train exports the student: ``<output_dir>/train/model``, absolute (a path or a
        URI); what evaluate's ``trained`` model is."""
        from palign.core import storage

        return storage.join(storage.absolute(self.stage_dir("train")), "model")

    def trained_adapter_dir(self) -> str:
        """Where a LoRA run (``train.lora``) also writes its adapter in PEFT's format:
        ``<output_dir>/train/adapter``, absolute; evaluate's ``adapter`` model."""
        from palign.core import storage

        return storage.join(storage.absolute(self.stage_dir("train")), "adapter")

    def template_kwargs_for(self, model: str) -> dict[str, Any]:
        """``models.chat_template_kwargs`` where ``model`` is the student (as named, its
        trained export or adapter, or the judge when no other judge is set), else none: a
        teacher or another model keeps its own template's defaults."""
        student = {self.models.student, self.trained_model_dir(), self.trained_adapter_dir()}
        return dict(self.models.chat_template_kwargs) if model in student else {}


def _merge_engine(raw: dict[str, Any]) -> dict[str, Any]:
    """Give each stage the top-level engine settings, overridden by its own."""
    base = raw.get("engine") or {}
    if not isinstance(base, dict):
        return raw
    merged = dict(raw)
    for stage in ENGINE_STAGES:
        section = raw.get(stage)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            continue
        own = section.get("engine") or {}
        if not isinstance(own, dict):
            continue
        replicas = {**(base.get("replicas") or {}), **(own.get("replicas") or {})}
        engine = {**base, **own}
        if replicas:
            engine["replicas"] = replicas
        kwargs = [k for k in (base.get("engine_kwargs"), own.get("engine_kwargs")) if k]
        if kwargs and all(isinstance(k, dict) for k in kwargs):  # merged key by key too
            engine["engine_kwargs"] = {key: v for k in kwargs for key, v in k.items()}
        merged[stage] = {**section, "engine": engine}
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
        return Config.model_validate(_merge_engine(raw))
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
    apply_overrides(raw, overrides, Config)
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
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
