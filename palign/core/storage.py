"""Where a run's data lives: a local path, ``s3://bucket/key`` or ``gs://bucket/key``.

Every file palign reads or writes outside a model's own loading goes through here, on
``pyarrow.fs``. Credentials and endpoints come from the standard environment (``AWS_*``,
including ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores; Google's application default
credentials for ``gs://``), so nothing here is palign-specific configuration.

Object stores have no rename and no append: a file appears whole or not at all when its upload
ends. ``write_bytes`` therefore writes whole objects (and, on a local disk, writes beside the
target and renames), and palign's exactly-once rules (``palign.core.shards``) are built on whole
writes under deterministic names plus a commit marker, never on renames.

Faults of the store that pass (503 SlowDown, other 5xx, time-outs, dropped connections) are
tried again, on every call of an object store's file system and every whole write, a bounded
number of times with backoff (``palign.core.retrying``); past that a call raises
``StorageUnavailable``. A full local disk raises ``DiskFull`` naming the folder, after removing
the half-written temporary file.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import posixpath
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from palign.core import retrying
from palign.core.failures import DiskFull

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
    """The file system of a bucket: the store's own client (as ``from_uri`` makes it from the
    standard environment: credentials, ``AWS_ENDPOINT_URL_S3``, the bucket's region) under
    palign's retries of transient faults (``palign.core.retrying``)."""
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


def move_dir(source: str | Path, target: str | Path) -> None:
    """Move a folder and everything under it to ``target`` (which must not exist yet): a
    rename on a local disk; on an object store, which has none, a copy of each object made in
    the store, then the source removed."""
    fs, src = resolve(source)
    _, dst = resolve(target)
    if not is_uri(source):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        return
    selector = pafs.FileSelector(src, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst + info.path[len(src):])
    fs.delete_dir(src)


def make_dir(location: str | Path) -> None:
    """Create a local folder (object stores need none: a prefix exists once an object does)."""
    if not is_uri(location):
        Path(_local(location)).mkdir(parents=True, exist_ok=True)


MAX_LINE_BYTES = 1 << 30  # no line of any JSONL file palign reads may be longer (ingest: less)


@dataclass(frozen=True)
class LongLine:
    """Stands in for a line longer than the reader's cap: read past, never held; its length
    in bytes (without the ``\\n``) and the cap it broke."""

    size: int
    cap: int

    @property
    def reason(self) -> str:
        return f"line over {self.cap} bytes ({self.size} bytes): not read"


class LineTooLong(ValueError):
    """A line over the cap where the reader yields only lines (``iter_lines``)."""


def iter_lines(location: str | Path, chunk: int = 1 << 22,
               max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The file's lines (without their ``\\n``), read in chunks: a file of any size streams
    through in bounded memory. A line over ``max_line`` bytes raises ``LineTooLong``."""
    for lineno, line in enumerate(_file_lines(location, chunk, max_line), 1):
        if isinstance(line, LongLine):
            raise LineTooLong(f"{location}: line {lineno}: {line.reason}")
        yield line


def _file_lines(location: str | Path, chunk: int, cap: int) -> Iterator[bytes | LongLine]:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        yield from _lines(f, chunk, cap)


def _lines(f: Any, chunk: int, cap: int) -> Iterator[bytes | LongLine]:
    """The lines of an open file from where it stands, read ``chunk`` bytes at a time; a line
    over ``cap`` bytes comes as a ``LongLine``. Linear in the file's size, holding at most
    about ``cap`` + 2 x ``chunk`` bytes: the pieces of a line that spans chunks are kept in a
    list and joined once at its end (never ``rest + block`` again and again, which copies a
    long line once per chunk), and once a line passes the cap its bytes are only counted."""
    parts: list[bytes] = []  # the line in hand, as read so far (empty once over the cap)
    held = 0  # its length in bytes
    while block := f.read(chunk):
        lines: list[Any] = block.split(b"\n")
        tail = lines.pop()
        if lines:  # the line in hand ends in this block
            size = held + len(lines[0])
            if size > cap:
                lines[0] = LongLine(size, cap)
            elif parts:
                lines[0] = b"".join((*parts, lines[0]))
            parts, held = [], 0
            if len(block) > cap:  # only then can a line wholly inside the block be too long
                lines[1:] = [ln if len(ln) <= cap else LongLine(len(ln), cap)
                             for ln in lines[1:]]
            yield from lines
        held += len(tail)
        if held > cap:
            parts = []
        elif tail:
            parts.append(tail)
    if held:
        yield LongLine(held, cap) if held > cap else b"".join(parts)


def iter_line_range(location: str | Path, start: int, stop: int | None,
                    chunk: int = 1 << 22, max_line: int = MAX_LINE_BYTES
                    ) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for the lines of an uncompressed file that start in
    ``[start, stop)`` (``stop`` None: the end), each read whole even where it runs past
    ``stop``. Ranges that tile a file give each of its lines to exactly one range: the
    splitting rule of a file read by several tasks. Only the range (and the end of its last
    line) is read: ranged reads on an object store. A line over ``max_line`` bytes raises
    ``LineTooLong``."""
    for offset, line in _range_lines(location, start, stop, chunk, max_line):
        if isinstance(line, LongLine):
            raise LineTooLong(f"{location}: line at byte {offset}: {line.reason}")
        yield offset, line


def _range_lines(location: str | Path, start: int, stop: int | None, chunk: int,
                 cap: int) -> Iterator[tuple[int, bytes | LongLine]]:
    fs, path = resolve(location)
    with fs.open_input_file(path) as f:
        at = max(0, start - 1)  # the file offset of the next line's first byte
        f.seek(at)
        # From start - 1, the text up to the first \n ends a line that began before ``start``
        # (or is the \n just before a line that begins at ``start``): an earlier range's.
        skip = start > 0
        for line in _lines(f, chunk, cap):
            size = line.size if isinstance(line, LongLine) else len(line)
            begin, at = at, at + size + 1
            if skip:
                skip = False
            elif stop is not None and begin >= stop:
                return
            else:
                yield begin, line


@dataclass(frozen=True)
class Unreadable:
    """What stands in for a row that cannot be read (a line that is not UTF-8 or not JSON, or
    over the reader's cap): why, and the start of its text when there is one."""

    reason: str
    raw: str | None = None


def iter_jsonl(location: str | Path, max_line: int = MAX_LINE_BYTES
               ) -> Iterator[tuple[int, Any]]:
    """(line number, row) for every non-blank line of a JSONL file, streamed; the one JSONL
    reader. Lines end at \\n only (a \\r inside a line is the line's own business), a CRLF
    ending and a byte-order mark before the first line are dropped. A line that is not UTF-8,
    or not JSON, or over ``max_line`` bytes comes as an ``Unreadable`` in its row's place, not
    as an exception: the caller decides whether it is a reject, a skipped line or an error."""
    for lineno, raw in enumerate(_file_lines(location, 1 << 22, max_line), 1):
        row = _json_line(raw, lineno == 1)
        if row is not _BLANK:
            yield lineno, row


def iter_jsonl_range(location: str | Path, start: int, stop: int | None,
                     max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """``iter_jsonl`` for the lines that start in ``[start, stop)`` of an uncompressed file
    (``iter_line_range``): (byte offset, row), since a range does not know its line numbers."""
    for offset, raw in _range_lines(location, start, stop, 1 << 22, max_line):
        row = _json_line(raw, offset == 0)
        if row is not _BLANK:
            yield offset, row


_BLANK = object()


def _json_line(raw: bytes | LongLine, first: bool) -> Any:
    """One JSONL line's row, an ``Unreadable``, or ``_BLANK`` for a blank line."""
    if isinstance(raw, LongLine):
        return Unreadable(raw.reason)
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
    except ValueError as err:  # a number past Python's int-to-text digit limit, among others
        return Unreadable(f"invalid JSON: {err}", line[:2000])


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
        # One try (the client's own retries only): a check before any work answers quickly.
        if retrying.unwrapped(fs).get_file_info(bucket).type == pafs.FileType.NotFound:
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
