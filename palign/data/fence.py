"""The fence: which run writes a stage folder now, and which of its index files readers admit.

When a stage run starts (under the run's lock) the driver seals what the folder holds into its
digest (``palign.data.digest``) and writes its own token to ``_index/_epoch.json``. From then on
an index file is visible only if the digest holds it as it is now or it carries that token in
its name: a late commit of a superseded run's worker is never seen, and is removed when the
folder is next cleaned (``shards.clean_uncommitted``). A folder no run has fenced admits
every index. ``Listing`` is one listing of a folder's ``_index/`` with that rule applied; the
digest and the shard readers both start from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from palign.data import storage
from palign.data.layout import DIGEST, EPOCH, INDEX, token_of


def read_epoch(folder: str | Path) -> str | None:
    """The token of the run that now writes ``folder`` (None: no run has fenced it)."""
    try:
        return str(json.loads(storage.read_text(storage.join(folder, INDEX, EPOCH)))["token"])
    except FileNotFoundError:
        return None


def write_epoch(folder: str | Path, token: str) -> None:
    """Fence ``folder`` for the run of ``token``: from now on an index is visible only if the
    digest holds it (sealed before this) or it is this run's. Under the run's lock, after
    ``write_digest`` has sealed what is there."""
    storage.write_text(storage.join(folder, INDEX, EPOCH), json.dumps({"token": token}))


class Listing:
    """A folder's committed index files as listed now (name -> [size, mtime ns]), its digest
    parts' names, and its epoch (the token of the run that writes it now, if one fenced it)."""

    def __init__(self, files: dict[str, list[int]], parts: list[str],
                 epoch: str | None = None) -> None:
        self.files, self.parts, self.epoch = files, parts, epoch

    @classmethod
    def of(cls, folder: str | Path) -> Listing:
        found = storage.stat_files(storage.join(folder, INDEX), suffixes=(".parquet",))
        files = {n: [size, mtime] for n, size, mtime in found if n.startswith("part-")}
        return cls(files, [n for n, _, _ in found if n.startswith(DIGEST)], read_epoch(folder))

    def admits(self, name: str) -> bool:
        """Whether an index the digest does not hold is visible: in an unfenced folder all
        are; in a fenced one only the current run's (a superseded run's late commit is not)."""
        return self.epoch is None or token_of(name) == self.epoch

    def rest(self, held: Iterable[str], also: Iterable[str] = ()) -> list[str]:
        """The listed index files not in ``held`` that the fence admits (or that are in
        ``also``: held by a digest part being dropped), in name order."""
        skip, extra = set(held), set(also)
        return [n for n in sorted(self.files)
                if n not in skip and (n in extra or self.admits(n))]
