"""Locations as text: a local path, ``s3://bucket/key`` or ``gs://bucket/key``, without touching
any of them.

Split from ``palign.data.storage`` so that the config (which makes its paths absolute and joins
its stage folders) needs no file system: these functions are pure string work on a location;
reading and writing one is ``palign.data.storage``, which re-exports them.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

SCHEMES = ("s3", "gs", "gcs")  # object stores, through pyarrow.fs
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def scheme(location: str | Path) -> str | None:
    """``s3``, ``gs``, ... for a URI (``file://`` counts as a local path), else None."""
    match = URI.match(str(location))
    if match is None:
        return None
    name = match.group(1).lower()
    return None if name == "file" else name


def is_uri(location: str | Path) -> bool:
    return scheme(location) is not None


def unsupported(location: str | Path) -> str | None:
    """Why ``location`` cannot be used (an unknown scheme), or None."""
    name = scheme(location)
    if name is None or name in SCHEMES:
        return None
    return f"{name}:// is not a supported storage scheme (use a local path, s3:// or gs://)"


def local(location: str | Path) -> str:
    """A local location as an absolute path (``file://`` and ``~`` resolved)."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI alike."""
    text = str(base)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def name(location: str | Path) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def absolute(location: str | Path) -> str:
    """A URI as it is; a local path made absolute (for workers that start elsewhere)."""
    return str(location) if is_uri(location) else local(location)
