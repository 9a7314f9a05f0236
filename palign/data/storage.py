"""Where a run's data lives: a local path, ``s3://bucket/key`` or ``gs://bucket/key``.

Every file palign reads or writes outside a model's own loading goes through here, on
``pyarrow.fs``. Credentials and endpoints come from the standard environment (``AWS_*``,
including ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores; Google's application default
credentials for ``gs://``), so nothing here is palign-specific configuration.

Object stores have no rename and no append: a file appears whole or not at all when its upload
ends. ``write_bytes`` therefore writes whole objects (and, on a local disk, writes beside the
target and renames), and palign's exactly-once rules (``palign.data.shards``) are built on whole
writes under deterministic names plus a commit marker, never on renames.

Faults of the store that pass (503 SlowDown, other 5xx, time-outs, dropped connections) are
tried again, on every call of an object store's file system and every whole write, a bounded
number of times with backoff (``palign.data.retrying``); past that a call raises
``StorageUnavailable``. A full local disk raises ``DiskFull`` naming the folder, after removing
the half-written temporary file.

Reading a file line by line (and the one JSONL reader) is ``palign.data.lines``; whole folders
uploaded, downloaded or moved, ``palign.data.transfer``: both go through this module.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from palign.common.failures import DiskFull
from palign.common.uri import (  # noqa: F401 - re-exported: storage.join, storage.is_uri, ...
    SCHEMES,
    URI,
    absolute,
    is_uri,
    join,
    local,
    name,
    scheme,
    unsupported,
)
from palign.data import retrying


class StorageError(OSError):
    """A location that cannot be used: an unknown scheme, a bucket that is not there."""


@functools.lru_cache(maxsize=32)
def _filesystem(kind: str, bucket: str) -> pafs.FileSystem:
    """The file system of a bucket: the store's own client (as ``from_uri`` makes it from the
    standard environment: credentials, ``AWS_ENDPOINT_URL_S3``, the bucket's region) under
    palign's retries of transient faults (``palign.data.retrying``)."""
    if kind == "local":
        return pafs.LocalFileSystem()
    prefix = f"{'gs' if kind == 'gcs' else kind}://"
    fs, _ = pafs.FileSystem.from_uri(prefix + bucket)
    if isinstance(fs, pafs.S3FileSystem):
        # The same options, with AWS's standard retries (5xx, throttling, time-outs) and
        # time-outs for a connection and for a stalled transfer.
        options = fs.__reduce__()[1][0]
        options.update(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retrying.S3_ATTEMPTS),
            connect_timeout=retrying.CONNECT_TIMEOUT_S, request_timeout=retrying.STALL_TIMEOUT_S)
        fs = pafs.S3FileSystem(**options)
    return pafs.PyFileSystem(retrying.RetryingFileSystem(fs, prefix, (_handler, (kind, bucket))))


def _handler(kind: str, bucket: str) -> retrying.RetryingFileSystem:
    """A bucket's retrying handler, as ``_filesystem`` made it in this process (unpickling)."""
    return _filesystem(kind, bucket).handler


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The file system that holds ``location`` and the path on it."""
    problem = unsupported(location)
    if problem:
        raise StorageError(f"{location}: {problem}")
    kind = scheme(location)
    if kind is None:
        return _filesystem("local", ""), local(location)
    rest = URI.match(str(location)).group(2).strip("/")  # type: ignore[union-attr]
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{location}: no bucket named")
    return _filesystem(kind, bucket), rest


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """A folder (on an object store: a prefix with at least one object under it)."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(folder: str | Path, prefix: str = "", suffixes: tuple[str, ...] = ()) -> list[str]:
    """The names (not paths) of the files directly in ``folder`` that start with ``prefix`` and
    end with one of ``suffixes``, sorted; [] for a folder that is not there."""
    return [file for file, _, _ in stat_files(folder, prefix, suffixes)]


def stat_files(folder: str | Path, prefix: str = "", suffixes: tuple[str, ...] = ()
               ) -> list[tuple[str, int, int]]:
    """``list_files`` with each file's size and modification time (ns), from the one listing:
    (name, size, mtime_ns), sorted by name."""
    fs, path = resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = ((posixpath.basename(i.path), i.size, i.mtime_ns or 0) for i in infos
             if i.type == pafs.FileType.File)
    return sorted(f for f in found if f[0].startswith(prefix)
                  and (not suffixes or f[0].endswith(suffixes)))


def list_dirs(folder: str | Path) -> list[str]:
    """The names of the folders directly in ``folder``, sorted; [] for one that is not there."""
    fs, path = resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write one whole file: readers see all of it or none of it (a local file is written
    beside its target and renamed into place; an object store's upload is whole by nature,
    and tried again whole on a transient fault). A full disk raises ``DiskFull``."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(Path(path), data)
        return
    store = retrying.unwrapped(fs)

    def upload() -> None:
        with store.open_output_stream(path) as f:
            f.write(data)

    retrying.retrying(upload, f"writing {location}")


def _write_local(path: Path, data: bytes) -> None:
    """``write_bytes`` on a local disk. On any failure the temporary file goes (nothing
    half-written stays behind); no space left is ``DiskFull``, naming the folder."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(_no_space(path.parent, len(data), err)) from err
        raise


def _no_space(folder: Path, size: int, err: OSError) -> str:
    """The message of a write that found no space left in ``folder``."""
    try:
        usage = shutil.disk_usage(folder)
        room = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB)"
    except OSError:
        room = ""
    return (f"no space left on the disk that holds {folder}{room}: a file of {size} bytes "
            f"could not be written there ({err.strerror or err}). Nothing half-written was "
            "kept. Free space on that disk (or set run.output_dir to one with room) and run "
            "again: what was written before is kept and not redone")


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete(location: str | Path) -> None:
    """Remove one file; a file that is not there is not an error."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(location: str | Path) -> None:
    """Remove a folder and everything under it; one that is not there is not an error."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def make_dir(location: str | Path) -> None:
    """Create a local folder (object stores need none: a prefix exists once an object does)."""
    if not is_uri(location):
        Path(local(location)).mkdir(parents=True, exist_ok=True)


def file_size(location: str | Path) -> int:
    """A file's size in bytes."""
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def bucket_problem(location: str | Path) -> str | None:
    """Why an object-store location cannot be reached (no such bucket, no access, no
    endpoint), or None; local paths and reachable buckets give None."""
    if scheme(location) not in SCHEMES:
        return None
    try:
        fs, path = resolve(location)
        bucket = path.split("/", 1)[0]
        # One try (the client's own retries only): a check before any work answers quickly.
        if retrying.unwrapped(fs).get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"bucket {bucket!r} does not exist (or these credentials cannot see it)"
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot reach it: {first}"
    return None
