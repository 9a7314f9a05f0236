"""Objects named by import path in the config (``"package.module:Name"``).

This is how a run brings in code palign does not ship: an engine backend
(``engine.backend: "mypkg.engines:MyBackend"``), and the tests' faulty engine. The module must
be importable where the object is used: on a Ray cluster, by every worker (palign forwards
``PYTHONPATH`` to the workers of a Ray it starts; a Ray job names it in its ``runtime_env``).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from palign.common.failures import ConfigError

IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # package.module:Name


def is_import_path(value: str) -> bool:
    """True when ``value`` has the form ``package.module:Name``."""
    return re.match(IMPORT_PATH, value) is not None


def load_object(path: str, field: str) -> Any:
    """The object ``path`` (``"package.module:Name"``) names; ``field``: the config field it
    came from (``truncate.engine.backend``), which the ConfigError raised otherwise names."""
    if not is_import_path(path):
        raise ConfigError(f"{field}: {path!r} is not an import path (package.module:Name)")
    module_name, name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - whatever the import raises, the field is wrong
        raise ConfigError(f"{field}: cannot import {module_name!r} ({type(err).__name__}: "
                          f"{err})") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"{field}: module {module_name!r} has no {name!r}") from None
