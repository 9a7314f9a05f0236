"""Transient faults of object storage, tried again: which errors pass, the backoff, and a
pyarrow file system that retries every call of the one it wraps.

Object stores fail now and then in ways that pass: S3 answers 503 SlowDown when a prefix gets
more requests than it takes, any store answers a 5xx or drops a connection under load, a
request times out. None of them is the data's fault, and each is worth trying again after a
pause. Two layers do that:

- the store's own client: pyarrow's S3 client runs AWS's standard retry strategy
  (``S3_ATTEMPTS`` tries, with its own short backoff) under connect and stall time-outs
  (``storage._filesystem``); Google's client retries GCS calls itself;
- palign, around every call on an object store's file system (``RetryingFileSystem``, which
  ``storage.resolve`` hands out, so that every reader and writer in palign goes through it,
  reads inside an open file included) and around each whole-object write: ``ATTEMPTS`` tries
  with exponential backoff and jitter, about 8 to 16 s of pauses in all. This layer also catches
  what the client does not retry: a 503 answered to a small ranged read, which the AWS SDK
  reports as ``INTERNAL_FAILURE ... Failed to flush response stream`` (S3's error body does
  not fit the read's buffer) and never tries again, and an upload that fails as a whole.

A call that still fails after its tries raises ``StorageUnavailable`` (an ``OSError``, and a
``MachineryError``: never a row's fault), naming the location and how long it was tried. An
error a retry cannot help (not found, no access, no space, a bad request) is raised at once,
unchanged.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from palign.common.failures import StorageUnavailable, describe

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 6  # palign's tries of one call (each of them the client's S3_ATTEMPTS tries)
BASE_S = 0.5  # the pause after the first failure; it doubles after each one ...
CAP_S = 8.0  # ... up to this; each pause is drawn from [half of it, all of it] (jitter)
S3_ATTEMPTS = 3  # the S3 client's own tries per request (AWS's standard strategy)
CONNECT_TIMEOUT_S = 5.0  # the S3 client's: a connection not made by then is a failed try
STALL_TIMEOUT_S = 30.0  # the S3 client's: a transfer with no byte for this long is one too

# Errors that no retry helps, whatever their message says.
_PERMANENT_TYPES = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                    NotADirectoryError)
_PERMANENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                    errno.ENOENT, errno.EEXIST, errno.EFBIG, errno.EINVAL}
_PERMANENT_TEXT = re.compile(
    r"access.?denied|no.?such.?(bucket|key|upload)|invalid.?access.?key|signature.?does.?not|"
    r"expired.?token|not.?found|forbidden|\b40[0134]\b", re.I)
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT,
                    errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH,
                    errno.ENETDOWN}
_TRANSIENT_TEXT = re.compile(
    r"slow.?down|reduce your request rate|throttl|too many requests|\b429\b|"
    r"\b50[0234]\b|service.?unavailable|internal.?(error|failure)|bad.?gateway|"
    r"time.?out|timed out|request.?timeout|connection (was )?(reset|aborted|refused|closed)|"
    r"broken pipe|network.?connection|couldn'?t connect|failed to flush response stream|"
    r"curlcode: (6|7|28|35|52|55|56)\b|temporarily unavailable|try again", re.I)


def transient(err: BaseException) -> bool:
    """Whether ``err`` is a storage fault that may pass: throttling (503 SlowDown, 429), a
    5xx, a time-out, a connection reset or refused. Never a missing file, no access, no space
    or an exhausted retry (``StorageUnavailable``)."""
    if not isinstance(err, OSError) or isinstance(err, (StorageUnavailable, *_PERMANENT_TYPES)):
        return False
    if err.errno in _PERMANENT_ERRNO:
        return False
    if err.errno in _TRANSIENT_ERRNO:
        return True
    text = str(err)
    return bool(_TRANSIENT_TEXT.search(text)) and not _PERMANENT_TEXT.search(text)


def pause(attempt: int) -> float:
    """The pause after failed try ``attempt`` (1, 2, ...): exponential, capped, jittered."""
    ceiling = min(CAP_S, BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retrying(op: Callable[[], T], what: str) -> T:
    """``op()``, tried again after a transient storage error (``transient``) up to
    ``ATTEMPTS`` tries in all; then ``StorageUnavailable`` naming ``what``."""
    start = time.monotonic()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return op()
        except OSError as err:
            if not transient(err):
                raise
            if attempt == ATTEMPTS:
                raise StorageUnavailable(
                    f"{what}: the store kept failing, {ATTEMPTS} tries over "
                    f"{time.monotonic() - start:.0f} s; last error: {describe(err)}") from err
            wait = pause(attempt)
            log.warning("%s: %s; trying again in %.1f s (try %d of %d)", what, describe(err),
                        wait, attempt + 1, ATTEMPTS)
            time.sleep(wait)
    raise AssertionError("unreachable")


class _Reader:
    """A file of the store, opened for reading, as a Python file whose every read is retried:
    each read is a ranged read at the position this object keeps, so a failed one leaves
    nothing half-done. ``pa.PythonFile`` makes it a pyarrow file again (Parquet and Arrow
    readers, ``read_at``, streams)."""

    mode = "rb"

    def __init__(self, f: Any, where: str) -> None:
        self._f, self._where, self._pos = f, where, 0
        self._size = f.size()
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        if n == 0:
            return b""
        at = self._pos
        data = retrying(lambda: self._f.read_at(n, at), f"reading {self._where}")
        self._pos += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._f.close()


class RetryingFileSystem(pafs.FileSystemHandler):
    """A ``pafs.PyFileSystem`` handler: every call of the file system ``fs`` (an object
    store's, at ``prefix`` such as ``s3://``), tried again on transient errors (``retrying``).
    Files opened for reading retry each read; a stream opened for writing is the store's own
    (its upload happens whole at close: ``storage.write_bytes`` retries the whole write).
    ``origin`` (a function and its arguments) rebuilds the handler in another process."""

    def __init__(self, fs: pafs.FileSystem, prefix: str,
                 origin: tuple[Callable[..., Any], tuple[Any, ...]] | None = None) -> None:
        self.fs, self.prefix, self._origin = fs, prefix, origin

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self._origin is None:
            raise TypeError("this RetryingFileSystem cannot be rebuilt elsewhere")
        return self._origin

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingFileSystem) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash(self.prefix)

    def _retry(self, op: Callable[[], T], doing: str, path: str) -> T:
        return retrying(op, f"{doing} {self.prefix}{path}")

    def get_type_name(self) -> str:
        return f"palign-retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        where = paths[0] if len(paths) == 1 else f"{{{len(paths)} paths}}"
        return self._retry(lambda: self.fs.get_file_info(paths), "looking up", where)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(lambda: self.fs.get_file_info(selector), "listing",
                           selector.base_dir)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(lambda: self.fs.create_dir(path, recursive=recursive), "creating", path)

    def delete_dir(self, path: str) -> None:
        self._retry(lambda: self.fs.delete_dir(path), "deleting", path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
                    "emptying", path)

    def delete_root_dir_contents(self) -> None:
        self._retry(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True),
                    "emptying", "/")

    def delete_file(self, path: str) -> None:
        self._retry(lambda: self.fs.delete_file(path), "deleting", path)

    def move(self, src: str, dest: str) -> None:
        self._retry(lambda: self.fs.move(src, dest), f"moving to {self.prefix}{dest}", src)

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(lambda: self.fs.copy_file(src, dest), f"copying to {self.prefix}{dest}",
                    src)

    def _open(self, path: str) -> pa.NativeFile:
        f = self._retry(lambda: self.fs.open_input_file(path), "opening", path)
        return pa.PythonFile(_Reader(f, self.prefix + path), mode="r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._open(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._open(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._retry(lambda: self.fs.open_output_stream(path, compression=None,
                                                              metadata=metadata),
                           "opening for writing", path)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_append_stream(path, compression=None, metadata=metadata)


def unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The store's own file system under a retrying one (``fs`` itself otherwise)."""
    handler = getattr(fs, "handler", None)
    return handler.fs if isinstance(handler, RetryingFileSystem) else fs
