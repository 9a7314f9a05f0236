"""``--set KEY=VALUE`` overrides: each dotted path checked against the config's fields before
it is applied to the YAML, so that a mistyped path fails as a config error naming it, not as a
traceback nor as an error about the field it happened to land in.

The rules: a path is dot-separated field names, none empty; each name but the last must be a
section (a nested model, or a free mapping such as ``engine.engine_kwargs``, below which any
key goes); a list (``evaluate.benchmarks``) is set whole, as YAML: ``evaluate.benchmarks=[...]``.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from palign.config.base import ConfigError, format_problems


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any],
                    model: type[BaseModel]) -> None:
    """Set each dotted path of ``overrides`` in ``raw`` (the YAML read, changed in place);
    ConfigError, naming every bad ``--set`` path at once, when one does not lead to a field of
    ``model`` or crosses something in ``raw`` that is not a mapping."""
    problems = [p for dotted in overrides if (p := path_problem(dotted, model))]
    if problems:
        raise ConfigError(format_problems(problems))
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.strip().split(".")
        for depth, key in enumerate(parents):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[:depth + 1])
                raise ConfigError(format_problems([
                    f"--set {dotted}: {where} in the config file is a "
                    f"{type(child).__name__}, not a section: fix the file first"]))
            node = child
        node[leaf] = value


def path_problem(dotted: str, model: type[BaseModel]) -> str | None:
    """Why ``dotted`` names no field of ``model``, as a line of a config error; None: it does."""
    parts = dotted.strip().split(".")
    if any(not p or p != p.strip() for p in parts):
        return (f"--set {dotted}: a path is field names joined by '.' (data.limit), with none "
                "empty and no spaces")
    current: type[BaseModel] | None = model  # None: inside a free mapping, any key goes
    for depth, part in enumerate(parts):
        if current is None:
            return None
        where = ".".join(parts[:depth]) or "the config"
        fields = current.model_fields
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            return f"--set {dotted}: {where} has no field {part!r}{hint}"
        if depth == len(parts) - 1:
            return None
        kind, nested = _holds(fields[part].annotation)
        path = ".".join(parts[:depth + 1])
        if kind == "list":
            return f"--set {dotted}: {path} is a list; set it whole: {path}=[...]"
        if kind == "value":
            return f"--set {dotted}: {path} is a value, not a section with fields"
        current = nested
    return None


def _holds(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """What a field holds: ("model", the model), ("mapping", None), ("list", None) or
    ("value", None); an optional field holds what its non-None part holds."""
    if get_origin(annotation) in (Union, types.UnionType):
        parts = [a for a in get_args(annotation) if a is not type(None)]
        if len(parts) == 1:
            return _holds(parts[0])
        kinds = [_holds(a) for a in parts]
        return next((k for k in kinds if k[0] in ("model", "mapping")), ("value", None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin = get_origin(annotation)
    if origin is dict or annotation is dict or (isinstance(origin, type)
                                                and issubclass(origin, Mapping)):
        return "mapping", None
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list", None
    return "value", None


def parse_set_args(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments (``palign run``, ``audit``, ``plan``) as {dotted path:
    value parsed as YAML}; ConfigError for an argument without ``=`` or a value YAML cannot
    read (``apply_overrides`` checks the paths)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(format_problems([f"--set {pair!r}: expected KEY=VALUE, KEY a "
                                               "field's dotted path (data.limit=5)"]))
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).split("\n")[0]
            raise ConfigError(format_problems([
                f"--set {pair!r}: {key.strip()}: the value is not valid YAML ({problem}); "
                "quote text that should stay as it is"])) from None
    return out
