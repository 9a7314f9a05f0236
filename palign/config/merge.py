"""The one rule palign merges settings by: mappings key by key, anything else replaced.

Used wherever one layer of settings is laid over another: a config over the one it ``extends``,
a stage's ``engine`` over the top-level ``engine`` (``engine_kwargs`` included, so a mapping
value inside it, such as vLLM's ``compilation_config``, merges key by key too), and
``train.deepspeed`` over the DeepSpeed config palign generates. One function, so the three
never disagree on what a nested mapping or a list does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``: where both hold a mapping under a key, the two merge
    recursively; otherwise ``top``'s value wins, lists and ``None`` included (a list is one
    value, and ``null`` is how a config clears a setting). Neither input is changed."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = deep_merge(below, value)
        else:
            out[key] = value
    return out
