"""How a stage folder is laid out: the names of its files and folders, and the run token in them.

A stage folder holds data shards (``part-<stem>.jsonl`` or ``.parquet``), their indexes under
``_index/`` (``part-<stem>.jsonl.parquet``), the digest parts and the fence's epoch file beside
them, a ``rejects/`` folder of the same shape and, once the stage is whole, ``_DONE``. Every
other module of the data plane (``fence``, ``digest``, ``shards``, the runtime's readers) names
files through here, so the layout is written down once; nothing here reads or writes a shard.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from palign.data import storage

FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}
REJECTS = "rejects"
RETRIED = "rejects_retried"
INDEX = "_index"
DONE_MARKER = "_DONE"
FILE = "_file"  # the column read_index adds: the data shard each id is in
DIGEST = "_digest"  # in _index/: ``_digest-000000.parquet``...: the indexes in a few files
EPOCH = "_epoch.json"  # in _index/: the token of the run that writes the folder now (the fence)


def batch_stem(token: str, ids: Iterable[str]) -> str:
    """A batch's shard name: the run's token and a hash of its ids, so a retried batch writes
    the same names (and finds its own commit) while a later run never meets an earlier one's.
    Each id is hashed with its length before it (``5:a\nb``), so no two sets of ids hash the
    same text, whatever characters the ids hold."""
    text = "".join(f"{len(i)}:{i}" for i in sorted(ids))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"part-{token}-{digest}"


def token_of(name: str) -> str:
    """The run token in a shard's name (``part-<token>-<hash>.jsonl``); "" for other names."""
    return name.split("-", 2)[1].split(".")[0] if name.startswith("part-") else ""


def new_token() -> str:
    """A token no earlier run of a stage has used (time-ordered)."""
    return f"{time.time_ns():020d}{uuid.uuid4().hex[:6]}"


def data_name(stem: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}")
    return stem + FORMATS[fmt]


def index_path(data_path: str) -> str:
    """The index file of the data shard at ``data_path`` (a local path or a URI)."""
    folder, name = data_path.rsplit("/", 1) if storage.is_uri(data_path) \
        else (str(Path(data_path).parent), Path(data_path).name)
    return storage.join(folder, INDEX, name + ".parquet")


def is_committed(folder: str | Path, stem: str, fmt: str) -> bool:
    return storage.exists(storage.join(folder, INDEX, data_name(stem, fmt) + ".parquet"))
