"""Sentence segmentation of chain-of-thought text with exact character offsets.

One left-to-right scan records cut offsets. Protected LaTeX regions (``$...$``, ``$$...$$``,
``\\(...\\)``, ``\\[...\\]``, ``\\begin{env}...\\end{env}``, ``\\boxed{...}``) are skipped whole.
Every cut sits right after a non-whitespace character, so the whitespace between two sentences
opens the next one and each prefix of the text is exactly ``cot[:offset]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_TERMINAL = ".!?…"
_CLOSERS = "\"')]}*”’»"  # may trail the final punctuation and still belong to the sentence
_OPENERS = "$\\([\"'“‘*"  # non-letters that can open a sentence on the same line
# Compared lowercase and without the final period.
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf resp approx viz al dr mr mrs ms prof".split()
    + "fig figs eq eqs eqn thm lem prop sec".split()
)
_STEP_WORDS = frozenset({"step", "case", "part"})

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_LIST_ITEM = re.compile(r"[^\S\n]*(?:[-*•]|\d{1,3}(?:\.\d{1,3})*[.)]|#{1,6})[^\S\n]")
_NUMBER = re.compile(r"\d{1,3}(?:\.\d{1,3})*")
_TEXT_ON_LINE = re.compile(r"[^\S\n]+\S")
_SPACE_DIGIT = re.compile(r"[^\S\n]+\d")
_BEGIN = re.compile(r"\\begin\{([^{}\s]+)\}")


def sentence_ends(cot: str) -> list[int]:
    """End offsets of the sentences of `cot`: strictly increasing, each in (0, len(cot)],
    the last equal to len(cot). Sentence i is cot[ends[i-1]:ends[i]] (the first starts at 0),
    and every sentence contains at least one non-whitespace character.
    Empty or whitespace-only text has no sentences: []."""
    n = len(cot)
    cuts = [0]
    content_end = 0  # offset just past the last non-whitespace character seen
    regions = _Regions(cot)
    i = 0
    while i < n:
        ch = cot[i]
        if ch == "\\" and cot.startswith("\\$", i):
            content_end = i = i + 2
            continue
        if ch in "$\\":
            end, inner = regions.span(i)
            if end > 0:
                content_end = p = _skip_closers(cot, end)
                # A display that ends its own sentence ("\[ x = 1. \]") closes it too.
                tail = cot[i:inner].rstrip()[-1:]
                if tail and tail in _TERMINAL and _boundary_after(cot, p):
                    _add(cuts, p)
                i = end
                continue
        if ch in _TERMINAL:
            j = i
            while j < n and cot[j] in _TERMINAL:
                j += 1
            run = cot[i:j]
            p = _skip_closers(cot, j)
            ellipsis = "…" in run or ".." in run
            if _boundary_after(cot, p, strict=ellipsis) and not (
                run == "." and (_is_abbreviation(cot, i) or _is_marker(cot, i, cuts[-1]))
            ):
                _add(cuts, p)
            content_end = i = j
            continue
        if ch == "\n":
            if content_end > cuts[-1] and _line_break_cuts(cot, i, content_end):
                _add(cuts, content_end)
        elif not ch.isspace():
            content_end = i + 1
        i += 1

    ends: list[int] = []
    prev = 0
    for e in cuts[1:] + [n]:
        # A whitespace-only piece merges into the next sentence (or, at the end, the last one).
        if e > prev and not cot[prev:e].isspace():
            ends.append(e)
            prev = e
    if ends:
        ends[-1] = n
    return ends


def prefix(cot: str, ends: list[int], k: int) -> str:
    """The first k sentences, byte for byte: cot[:ends[k-1]] (1 <= k <= len(ends))."""
    if not 1 <= k <= len(ends):
        raise ValueError(f"k={k} is outside 1..{len(ends)}")
    return cot[: ends[k - 1]]


def _add(cuts: list[int], p: int) -> None:
    if p > cuts[-1]:
        cuts.append(p)


def _skip_closers(text: str, p: int) -> int:
    while p < len(text) and text[p] in _CLOSERS:
        p += 1
    return p


def _boundary_after(text: str, p: int, strict: bool = False) -> bool:
    """Whether a sentence whose final punctuation ends at p ends there.

    It does at the end of the text, before a line break, or before same-line whitespace and a
    sentence opener (only a capital letter after an ellipsis, which often sits in a list).
    """
    k = p
    while k < len(text) and text[k].isspace():
        k += 1
    if k == len(text):
        return True
    if k == p:
        return False
    if "\n" in text[p:k]:
        return True
    c = text[k]
    if strict:
        return c.isupper()
    return c.isdigit() or (c.isalpha() and not c.islower()) or c in _OPENERS


def _line_break_cuts(text: str, i: int, content_end: int) -> bool:
    """Whether the newline at i ends the sentence: a blank line, a list item or a ':' line."""
    if _BLANK_LINE.match(text, i) or _LIST_ITEM.match(text, i + 1):
        return True
    q = content_end
    while q > 0 and text[q - 1] in _CLOSERS:
        q -= 1
    return text[q - 1 : q] == ":"


def _is_abbreviation(text: str, i: int) -> bool:
    """Whether the '.' at i closes a known abbreviation such as 'e.g.' or 'Eq.'."""
    s, stop = i, max(0, i - 8)  # no abbreviation is longer; bounds the scan
    while s > stop and (text[s - 1].isalpha() or text[s - 1] == "."):
        s -= 1
    token = text[s:i].lower()
    if token == "no":  # "No. 5" is a number; "the answer is no." is not
        return _SPACE_DIGIT.match(text, i + 1) is not None
    return token in _ABBREVIATIONS


def _is_marker(text: str, i: int, last_cut: int) -> bool:
    """Whether the '.' at i closes a step number ('1.', '2.3.', 'Step 3.') that opens a line
    or a sentence and is followed by text on the same line."""
    s, stop = i, max(0, i - 16)  # longer than any step number; bounds the scan
    while s > stop and (text[s - 1].isdigit() or text[s - 1] == "."):
        s -= 1
    if not _NUMBER.fullmatch(text, s, i) or not _TEXT_ON_LINE.match(text, i + 1):
        return False
    k = s
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    w = k
    while w > 0 and text[w - 1].isalpha():
        w -= 1
    if k < s and text[w:k].lower() in _STEP_WORDS:
        k = w
    start = k
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start in (0, last_cut) or "\n" in text[start:k]


class _Regions:
    """Finds protected regions (math, \\boxed) opening at an offset. Searches are cached, and
    the scanner only moves forward, so many unmatched openers still cost linear time."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.hits: dict[str, tuple[int, int]] = {}  # key -> (searched from, first hit or len)
        self.braces: dict[int, int] | None = None  # offset of '{' -> offset of its '}'

    def span(self, i: int) -> tuple[int, int]:
        """(end, start of the closing delimiter) of the region opening at i, or (-1, -1) when
        none does (an unmatched opener is plain text)."""
        text = self.text
        if text.startswith("$$", i):
            return self._close("$$", i + 2)
        if text[i] == "$":
            return self._inline_math(i)
        if text.startswith("\\(", i):
            return self._close("\\)", i + 2)
        if text.startswith("\\[", i):
            return self._close("\\]", i + 2)
        if text.startswith("\\boxed{", i):
            return self._brace_group(i + 6)
        m = _BEGIN.match(text, i)
        if m:
            return self._close("\\end{" + m.group(1) + "}", m.end())
        return -1, -1

    def _first(self, key: str, start: int, find: Callable[[int], int]) -> int:
        # A hit h first found from s is also the first hit from any start in [s, h].
        s, h = self.hits.get(key, (len(self.text) + 1, -1))
        if not s <= start <= h:
            h = find(start)
            self.hits[key] = (start, h)
        return h

    def _close(self, closer: str, start: int) -> tuple[int, int]:
        n = len(self.text)
        j = self._first(closer, start, lambda q: _found(self.text.find(closer, q), n))
        return (j + len(closer), j) if j < n else (-1, -1)

    def _inline_math(self, i: int) -> tuple[int, int]:
        """Inline $...$ in the usual Markdown sense, so that prices like '$5 and $10' stay text:
        the opener is followed by non-space, the closer preceded by non-space and not followed
        by a digit, and the span never crosses a blank line."""
        text = self.text
        if i + 1 >= len(text) or text[i + 1].isspace():
            return -1, -1
        j = self._first("$", i + 1, self._dollar_closer)
        blank = self._first("blank", i, self._blank_line)
        return (j + 1, j) if j < blank else (-1, -1)

    def _dollar_closer(self, q: int) -> int:
        text = self.text
        j = text.find("$", q)
        while j >= 0:
            before = text[j - 1]
            if not before.isspace() and before != "\\" and not text[j + 1 : j + 2].isdigit():
                return j
            j = text.find("$", j + 1)
        return len(text)

    def _blank_line(self, q: int) -> int:
        m = _BLANK_LINE.search(self.text, q)
        return m.start() if m else len(self.text)

    def _brace_group(self, i: int) -> tuple[int, int]:
        """The balanced {...} group opening at i; escaped braces do not count."""
        if self.braces is None:
            self.braces, stack, text, j = {}, [], self.text, 0
            while j < len(text):
                c = text[j]
                if c == "\\":
                    j += 1
                elif c == "{":
                    stack.append(j)
                elif c == "}" and stack:
                    self.braces[stack.pop()] = j
                j += 1
        j = self.braces.get(i, -1)
        return (j + 1, j) if j >= 0 else (-1, -1)


def _found(j: int, n: int) -> int:
    return j if j >= 0 else n
