"""What a config's paths must be before any work starts; ``palign validate`` and every run check.

The run's data, output, train storage, benchmarks and model folders may be local paths or
``s3://``/``gs://`` URIs (``palign.data.storage``). An unknown scheme fails here, naming the field,
and so does a bucket that does not exist or cannot be reached. ``models.cache_dir`` is each
machine's own disk and refuses a URI by name. The data a run reads, the model folders it
serves and the benchmarks it evaluates must exist (a model folder may be a LoRA adapter). Hub
ids (``org/name``) cannot be checked without the hub and pass. A ``train.lora`` naming modules
the student does not have fails here too (``lora_problems``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from palign.config import Config, ConfigError, format_problems, stage_names, stages_before
from palign.data import storage
from palign.stages import registry

# Fields that take a URI; the others need a path on the machine.
logger = logging.getLogger(__name__)

URI_FIELDS = ("run.output_dir", "data.path", "train.storage_path", "evaluate.benchmarks.",
              "models.student", "models.teacher", "models.judge", "evaluate.models.")


def check_paths(cfg: Config, stages: list[str] | None = None) -> None:
    """Raise ConfigError listing every problem, each with its field's dotted path."""
    problems = path_problems(cfg, stages)
    if problems:
        raise ConfigError(format_problems(problems))


def check_engine_kwargs(cfg: Config, stages: list[str] | None = None) -> None:
    """Raise ConfigError when a stage's ``engine.engine_kwargs`` names something that is not a
    vLLM engine argument, or one palign sets itself (``palign.engines.engine_args``), or its
    ``engine.backend`` names by import path a class that cannot be imported here; also when a
    remote engine's key variable is unset where this run's local Ray would hand it on, and when
    a tracker ``train.report_to`` names is not installed (``palign.train.trackers``)."""
    from palign.common.plugins import is_import_path
    from palign.engines import backend_class, is_remote
    from palign.engines.engine_args import kwargs_problems
    from palign.train.trackers import tracker_problems

    problems = []
    stages = stages or cfg.run.stages
    for stage in stages:
        engine = getattr(getattr(cfg, stage, None), "engine", None)
        if engine is not None:
            problems += kwargs_problems(f"{stage}.engine.engine_kwargs", engine.engine_kwargs,
                                        engine.backend)
            if is_import_path(engine.backend):
                try:
                    backend_class(engine.backend, f"{stage}.engine.backend")
                except ConfigError as err:
                    problems.append(str(err))
            # a local Ray's workers inherit this process's environment: the key must be in it
            # (on a cluster the nodes hold it; each engine actor checks at its start)
            if (is_remote(engine.backend) and engine.api_key_env and cfg.ray.address is None
                    and not os.environ.get(engine.api_key_env)):
                problems.append(f"{stage}.engine.api_key_env: {engine.api_key_env} is not set "
                                "in this environment (the local Ray's engine actors read the "
                                "key from it)")
    if "train" in stages:
        problems += tracker_problems(cfg)
    if problems:
        raise ConfigError(format_problems(problems))


def path_problems(cfg: Config, stages: list[str] | None = None) -> list[str]:
    stages = list(stages or cfg.run.stages)
    problems = [p for field, value in _path_fields(cfg)
                if (p := _scheme_problem(field, value, stages))]
    if problems:
        return problems
    buckets: dict[tuple[str | None, str], str | None] = {}  # each bucket is asked once
    for field, value in _path_fields(cfg):
        if not (value and field.startswith(URI_FIELDS) and storage.is_uri(value)):
            continue
        bucket = (storage.scheme(value), value.split("://", 1)[1].split("/", 1)[0])
        if bucket not in buckets:
            buckets[bucket] = storage.bucket_problem(value)
        if (why := buckets[bucket]):
            problems.append(f"{field}: {value}: {why}")
    if problems:
        return problems
    earlier = stages_before(cfg.run.stages, stages[0])
    reads_source = not earlier and registry.get(stages[0]).driver == "rows"
    ingested = storage.exists(storage.join(cfg.run.output_dir, "ingest", "_DONE"))
    if reads_source and not ingested and not storage.exists(cfg.data.path):
        problems.append(f"data.path: {cfg.data.path} does not exist")
    for field, name in _models(cfg, stages):
        if (p := _model_problem(field, name, cfg.models.cache_dir)):
            problems.append(p)
    if "evaluate" in stages:
        for i, bench in enumerate(cfg.evaluate.benchmarks):
            if not storage.exists(bench.path):
                problems.append(f"evaluate.benchmarks.{i}.path: {bench.path} does not exist "
                                f"(benchmark {bench.name})")
    if not problems and "train" in stages and cfg.train.lora is not None:
        problems += lora_problems(cfg)
    return problems


def lora_problems(cfg: Config) -> list[str]:
    """``train.lora``'s module names against the student's modules (its config alone, on the
    meta device). A student on object storage or a hub id not in the local cache is checked
    when training starts instead (PEFT refuses a missing target there)."""
    from palign.engines.models import REGISTRY, resolve_model
    from palign.train.lora import module_names, module_problems

    lora, student = cfg.train.lora, cfg.models.student
    assert lora is not None
    if not isinstance(lora.target_modules, list) and not lora.modules_to_save:
        return []
    if storage.is_uri(student):
        return []
    if student in REGISTRY or Path(student).expanduser().is_dir():
        path = resolve_model(student, cfg.models.cache_dir)
    else:
        path = _cached_hub_model(student)
        if path is None:
            logger.info("train.lora: %s is not in the local hub cache; its module names are "
                        "checked when training starts", student)
            return []
    return module_problems(lora, module_names(path))


def _cached_hub_model(hub_id: str) -> str | None:
    """The local snapshot folder of a hub model's config (at its pinned revision, for
    ``org/name@revision``), if the hub cache has it."""
    from palign.common.modelref import split_revision

    repo, revision = split_revision(hub_id)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=revision, allow_patterns=["config.json"],
                                 local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or no hub library): cannot check here
        return None


def _path_fields(cfg: Config) -> list[tuple[str, str | None]]:
    fields = [("run.output_dir", cfg.run.output_dir), ("data.path", cfg.data.path),
              ("train.storage_path", cfg.train.storage_path),
              ("models.cache_dir", cfg.models.cache_dir),
              ("models.student", cfg.models.student), ("models.teacher", cfg.models.teacher),
              ("models.judge", cfg.models.judge)]
    fields += [(f"evaluate.benchmarks.{i}.path", b.path)
               for i, b in enumerate(cfg.evaluate.benchmarks)]
    fields += [(f"evaluate.models.{i}.model", m.model) for i, m in enumerate(cfg.evaluate.models)]
    return fields


def _scheme_problem(field: str, value: str | None, stages: list[str]) -> str | None:
    if not value:
        return None
    why = storage.unsupported(value)
    if why:
        return f"{field}: {value}: {why}"
    if not storage.is_uri(value):
        return None
    if not field.startswith(URI_FIELDS):
        return (f"{field}: {value}: this field needs a path on the machine (each node's own "
                "disk)")
    return None


def _models(cfg: Config, stages: list[str]) -> list[tuple[str, str]]:
    """The models the listed stages will load, with the field that names each."""
    out = [m for s in stage_names() if s in stages for m in registry.get(s).models_used(cfg)]
    return list(dict.fromkeys(out))


def _model_problem(field: str, name: str, cache_dir: str | None) -> str | None:
    from palign.common.modelref import split_revision
    from palign.engines.models import REGISTRY

    name, _ = split_revision(name)  # org/name@revision: the revision is the hub's to check

    if name in REGISTRY:
        return None
    if storage.is_uri(name):
        if not any(storage.is_file(storage.join(name, m))
                   for m in ("config.json", "adapter_config.json")):
            return (f"{field}: {name} is neither a Hugging Face model folder (no config.json) "
                    "nor a LoRA adapter folder (no adapter_config.json)")
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            return (f"{field}: {name} is neither a Hugging Face model folder (no config.json) "
                    "nor a LoRA adapter folder (no adapter_config.json)")
        return None
    # A hub id is "org/name"; anything else that is not a folder here is a mistake (a missing
    # folder, a misspelt short name).
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        known = ", ".join(sorted(REGISTRY))
        return (f"{field}: {name} is neither a model folder that exists, a short name "
                f"({known}), nor a hub id (org/name)")
    return None  # a hub id: only the hub can tell
