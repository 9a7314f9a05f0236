"""Whole folders moved between storages: listed, uploaded, downloaded, moved.

A trained model's export is uploaded to object storage (the file a reader waits for last), a
model folder on object storage is downloaded to each node before an engine loads it, and a
stage folder put aside by ``--restart`` is moved. Each goes file by file through
``palign.data.storage``, so the whole-write and retry rules hold for every file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from palign.data import storage


def walk_files(folder: str | Path) -> list[str]:
    """The paths (relative to ``folder``, with ``/``) of every file under it, sorted."""
    fs, path = storage.resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos
                  if i.type == pafs.FileType.File and i.path.startswith(root))


def upload_dir(local: str | Path, target: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder to ``target`` (any location), file by file, the ``last`` names
    after all others: a reader that waits for one of them sees a whole folder."""
    names = walk_files(local)
    for rel in sorted(names, key=lambda n: (n in last, n)):
        storage.write_bytes(storage.join(target, rel), Path(local, rel).read_bytes())


def download_dir(source: str, local: str | Path) -> int:
    """Copy every file under ``source`` into the local folder ``local``; returns how many."""
    names = walk_files(source)
    fs, root = storage.resolve(source)
    for rel in names:
        dest = Path(local, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root.rstrip('/')}/{rel}") as f, open(dest, "wb") as out:
            while block := f.read(1 << 24):
                out.write(block)
    return len(names)


def move_dir(source: str | Path, target: str | Path) -> None:
    """Move a folder and everything under it to ``target`` (which must not exist yet): a
    rename on a local disk; on an object store, which has none, a copy of each object made in
    the store, then the source removed."""
    fs, src = storage.resolve(source)
    _, dst = storage.resolve(target)
    if not storage.is_uri(source):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        return
    selector = pafs.FileSelector(src, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst + info.path[len(src):])
    fs.delete_dir(src)
