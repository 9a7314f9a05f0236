"""A model as the config names it, read as text: a hub id with a pinned revision
(``org/name@v1.0``, ``org/name@<commit>``) split into the id and the revision.

Pure string work, so the config can refuse a bad revision before any work and every later layer
(preflight, the model resolver, fingerprints) reads the same split. Only a hub id takes a
revision: a short name, a local folder or an object-storage URI names its files already, and
an ``@`` there is a mistake the config reports (``revision_problem``)."""

from __future__ import annotations

import re

# A commit, a branch or a tag as the hub names them (tags may hold "/": refs/pr/1).
REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


def is_hub_id(name: str) -> bool:
    """The shape of a hub id, ``org/name``: one ``/``, both parts non-empty, no scheme, and not
    a path (``/``, ``.`` or ``~`` first). Whether the hub knows it is another question."""
    if "://" in name or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return False
    org, repo = name.split("/")
    return bool(org.strip()) and bool(repo.strip()) and not any(c.isspace() for c in name)


def split_revision(name: str) -> tuple[str, str | None]:
    """``("org/name", "v1")`` for ``org/name@v1``; ``(name, None)`` for anything that is not a
    hub id with a well-formed revision (no ``@``, a path, a short name, a bad revision)."""
    base, at, rev = name.partition("@")
    if at and is_hub_id(base) and REVISION.match(rev):
        return base, rev
    return name, None


def revision_problem(name: str) -> str | None:
    """What is wrong with an ``@`` in a model's name, for the field that holds it; None when
    it has none, or it is a hub id's revision."""
    if "@" not in name or split_revision(name)[1] is not None:
        return None
    base, _, rev = name.partition("@")
    if not is_hub_id(base):
        return f"a revision (@{rev}) is only for hub ids (org/name@revision)"
    return (f"revision {rev!r} is not a commit, branch or tag name (letters, digits and . _ / "
            "-, at most 128)")
