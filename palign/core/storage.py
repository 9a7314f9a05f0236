"""Where a run's data lives: a local path, ``s3://bucket/key`` or ``gs://bucket/key``.

Every file palign reads or writes outside a model's own loading goes through here, on
``pyarrow.fs``. Credentials and endpoints come from the standard environment (``AWS_*``,
including ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores; Google's application default
credentials for ``gs://``), so nothing here is palign-specific configuration.

Object stores have no rename and no append: a file appears whole or not at all when its upload
ends. ``write_bytes`` therefore writes whole objects (and, on a local disk, writes beside the
target and renames), and palign's exactly-once rules (``palign.core.shards``) are built on whole
writes under deterministic names plus a commit marker, never on renames.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "gcs")  # object stores, through pyarrow.fs
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


class StorageError(OSError):
    """A location that cannot be used: an unknown scheme, a bucket that is not there."""


def scheme(location: str | Path) -> str | None:
    """``s3``, ``gs``, ... for a URI (``file://`` counts as a local path), else None."""
    match = _URI.match(str(location))
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


def _local(location: str | Path) -> str:
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


@functools.lru_cache(maxsize=32)
def _filesystem(kind: str, bucket: str) -> pafs.FileSystem:
    if kind == "local":
        return pafs.LocalFileSystem()
    fs, _ = pafs.FileSystem.from_uri(f"{'gs' if kind == 'gcs' else kind}://{bucket}")
    return fs


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The file system that holds ``location`` and the path on it."""
    problem = unsupported(location)
    if problem:
        raise StorageError(f"{location}: {problem}")
    name = scheme(location)
    if name is None:
        return _filesystem("local", ""), _local(location)
    rest = _URI.match(str(location)).group(2).strip("/")  # type: ignore[union-attr]
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{location}: no bucket named")
    return _filesystem(name, bucket), rest


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
    return str(location) if is_uri(location) else _local(location)


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
    return [name for name, _, _ in stat_files(folder, prefix, suffixes)]


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
    beside its target and renamed into place; an object store's upload is whole by nature)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".tmp-{Path(path).name}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


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
        Path(_local(location)).mkdir(parents=True, exist_ok=True)


def iter_lines(location: str | Path, chunk: int = 1 << 22) -> Iterator[bytes]:
    """The file's lines (without their ``\\n``), read in chunks: a file of any size streams
    through in bounded memory."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        yield from _lines(f, chunk)


def _lines(f: Any, chunk: int) -> Iterator[bytes]:
    """The lines of an open file from where it stands, read ``chunk`` bytes at a time."""
    rest = b""
    while block := f.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_line_range(location: str | Path, start: int, stop: int | None,
                    chunk: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for the lines of an uncompressed file that start in
    ``[start, stop)`` (``stop`` None: the end), each read whole even where it runs past
    ``stop``. Ranges that tile a file give each of its lines to exactly one range: the
    splitting rule of a file read by several tasks. Only the range (and the end of its last
    line) is read: ranged reads on an object store."""
    fs, path = resolve(location)
    with fs.open_input_file(path) as f:
        at = max(0, start - 1)  # the file offset of the next line's first byte
        f.seek(at)
        # From start - 1, the text up to the first \n ends a line that began before ``start``
        # (or is the \n just before a line that begins at ``start``): an earlier range's.
        skip = start > 0
        for line in _lines(f, chunk):
            begin, at = at, at + len(line) + 1
            if skip:
                skip = False
            elif stop is not None and begin >= stop:
                return
            else:
                yield begin, line


@dataclass(frozen=True)
class Unreadable:
    """What stands in for a row that cannot be read (a line that is not UTF-8 or not JSON):
    why, and the start of its text when there is one."""

    reason: str
    raw: str | None = None


def iter_jsonl(location: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) for every non-blank line of a JSONL file, streamed; the one JSONL
    reader. Lines end at \\n only (a \\r inside a line is the line's own business), a CRLF
    ending and a byte-order mark before the first line are dropped. A line that is not UTF-8,
    or not JSON, comes as an ``Unreadable`` in its row's place, not as an exception: the caller
    decides whether it is a reject, a skipped line or an error."""
    for lineno, raw in enumerate(iter_lines(location), 1):
        row = _json_line(raw, lineno == 1)
        if row is not _BLANK:
            yield lineno, row


def iter_jsonl_range(location: str | Path, start: int, stop: int | None
                     ) -> Iterator[tuple[int, Any]]:
    """``iter_jsonl`` for the lines that start in ``[start, stop)`` of an uncompressed file
    (``iter_line_range``): (byte offset, row), since a range does not know its line numbers."""
    for offset, raw in iter_line_range(location, start, stop):
        row = _json_line(raw, offset == 0)
        if row is not _BLANK:
            yield offset, row


_BLANK = object()


def _json_line(raw: bytes, first: bool) -> Any:
    """One JSONL line's row, an ``Unreadable``, or ``_BLANK`` for a blank line."""
    if first:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    raw = raw.removesuffix(b"\r")
    if not raw.strip():
        return _BLANK
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Unreadable(f"not valid UTF-8: {err.reason} at byte {err.start}",
                          raw[:2000].decode("utf-8", "replace"))
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return Unreadable(f"invalid JSON: {err.msg} (column {err.colno})", line[:2000])
    except RecursionError:
        return Unreadable("invalid JSON: nested too deeply", line[:2000])


COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")  # what pyarrow's streams decompress


def file_size(location: str | Path) -> int:
    """A file's size in bytes."""
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def bucket_problem(location: str | Path) -> str | None:
    """Why an object-store location cannot be reached (no such bucket, no access, no
    endpoint), or None; local paths and reachable buckets give None."""
    name = scheme(location)
    if name is None or name not in SCHEMES:
        return None
    try:
        fs, path = resolve(location)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"bucket {bucket!r} does not exist (or these credentials cannot see it)"
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot reach it: {first}"
    return None


def walk_files(folder: str | Path) -> list[str]:
    """The paths (relative to ``folder``, with ``/``) of every file under it, sorted."""
    fs, path = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos
                  if i.type == pafs.FileType.File and i.path.startswith(root))


def upload_dir(local: str | Path, target: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder to ``target`` (any location), file by file, the ``last`` names
    after all others: a reader that waits for one of them sees a whole folder."""
    names = walk_files(local)
    for rel in sorted(names, key=lambda n: (n in last, n)):
        write_bytes(join(target, rel), Path(local, rel).read_bytes())


def download_dir(source: str, local: str | Path) -> int:
    """Copy every file under ``source`` into the local folder ``local``; returns how many."""
    names = walk_files(source)
    fs, root = resolve(source)
    for rel in names:
        dest = Path(local, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root.rstrip('/')}/{rel}") as f, open(dest, "wb") as out:
            while block := f.read(1 << 24):
                out.write(block)
    return len(names)
