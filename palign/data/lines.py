"""Reading text files line by line, in bounded memory, from any storage; the one JSONL reader.

Every line palign reads from a file (a source's JSONL, a data shard, a file given to
``palign grade``) comes through here, streamed in chunks from ``palign.data.storage``: a file of
any size goes through in bounded memory, and a line over the reader's cap is read past and
counted, never held (``LongLine``). ``iter_line_range`` reads the lines that start in one byte
range, which is how a large uncompressed source is split between ingest tasks.
``iter_jsonl`` gives a row that cannot be read (not UTF-8, not JSON, too long) as an
``Unreadable`` in its place, so the caller decides whether it is a reject, a skipped line or
an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palign.data import storage

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
    fs, path = storage.resolve(location)
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
    fs, path = storage.resolve(location)
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
