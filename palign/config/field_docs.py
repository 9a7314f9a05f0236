"""Every field of a config with its value, default and description (``palign validate
--explain``)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from palign.config.root import Config, config_model


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # the default of a field that has none


class FieldDoc(NamedTuple):
    """One field of a config. ``path`` is dotted; the fields of a list's items read
    ``evaluate.benchmarks[].name``, with ``value`` the list of every item's value. A ``section``
    (a nested model) has its fields on the rows after it, and no value or default of its own."""

    path: str
    value: Any  # JSON-like
    default: Any  # JSON-like, or REQUIRED
    description: str
    section: bool = False


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        args = get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True
    return None, False


def config_models(root: type[BaseModel] | None = None) -> list[type[BaseModel]]:
    """Every model reachable from ``root`` (default: ``config_model()``, the whole config with
    a section per stage) through its fields, ``root`` first."""
    seen: list[type[BaseModel]] = [root or config_model()]
    for model in seen:
        for field in model.model_fields.values():
            nested, _ = _nested_model(field.annotation)
            if nested is not None and nested not in seen:
                seen.append(nested)
    return seen


def explain(cfg: Config) -> list[FieldDoc]:
    """Every field of ``cfg``, depth first in declaration order. A field's default is the one
    it has where it sits (``generate.sampling.repetition_penalty``: 1.0, the default
    ``generate.sampling``'s), not a stage's merged top-level ``engine``."""
    rows: list[FieldDoc] = []
    _explain(type(cfg), [cfg], None, "", False, rows)
    return rows


def _explain(model: type[BaseModel], values: list[BaseModel], default: BaseModel | None,
             prefix: str, many: bool, rows: list[FieldDoc]) -> None:
    """``values``: the instances whose fields are listed (every item of a list when ``many``);
    ``default``: the instance the defaults come from (None: the model's own field defaults)."""
    for name, field in model.model_fields.items():
        path = prefix + name
        own = [getattr(v, name) for v in values]
        if default is not None:
            dflt = getattr(default, name)
        elif field.is_required():
            dflt = REQUIRED
        else:
            dflt = field.get_default(call_default_factory=True)
        description = field.description or ""
        nested, is_list = _nested_model(field.annotation)
        if nested is None or is_list:
            value = [to_jsonable_python(v) for v in own] if many else to_jsonable_python(own[0])
            shown = dflt if dflt is REQUIRED else to_jsonable_python(dflt)
            rows.append(FieldDoc(path, value, shown, description))
            if nested is not None:  # a list of models: its items' fields, once
                items = [item for v in own for item in v]
                _explain(nested, items, None, path + "[].", True, rows)
        else:
            rows.append(FieldDoc(path, None, None, description, section=True))
            _explain(nested, own, None if dflt is REQUIRED else dflt, path + ".", many, rows)


def format_explain(cfg: Config) -> str:
    """``explain(cfg)`` as text, one line per field:
    ``path = value (default: ...) -- description``."""
    def show(v: Any) -> str:
        return "required" if v is REQUIRED else json.dumps(v, ensure_ascii=False)

    lines = []
    for row in explain(cfg):
        if row.section:
            lines.append(f"{row.path} -- {row.description}")
        else:
            lines.append(f"{row.path} = {show(row.value)} (default: {show(row.default)}) -- "
                         f"{row.description}")
    return "\n".join(lines)
