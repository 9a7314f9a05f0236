"""The prefix search as a state machine: no engine, no Ray.

A search asks for probes (``next_probe``), is told each verdict (``record``), and ends with the
number of sentences to keep. Many searches advance together: the caller gathers every pending
probe, judges them in one batched engine call, and feeds the verdicts back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    k: int  # sentences in the judged prefix
    verdict: str  # "ENOUGH", "NOT_ENOUGH" (or "UNPARSED", counted as NOT_ENOUGH)
    score: float | None  # P(ENOUGH) when verdicts come from label scores


@dataclass
class SearchResult:
    kept: int  # sentences kept, 1..total
    total: int
    sufficient: bool  # False when the full CoT was kept for want of a sufficient prefix
    probes: list[Probe] = field(default_factory=list)


class PrefixSearch:
    """Base: a search over k in [1, total] that never probes (the ``full`` strategy)."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a search needs at least one sentence")
        self.total = total
        self.probes: list[Probe] = []

    def next_probe(self) -> int | None:
        """The k to judge next, or None when the search is over."""
        return None

    def record(self, k: int, verdict: str, score: float | None = None) -> None:
        raise RuntimeError("this search takes no probes")

    def result(self) -> SearchResult:
        return SearchResult(self.total, self.total, True, list(self.probes))


class FullSearch(PrefixSearch):
    """Keep the whole CoT (the full-CoT SFT baseline)."""


class FixedRatioSearch(PrefixSearch):
    """Keep a fixed share of the sentences, rounded up, at least one (the paper's baseline)."""

    def __init__(self, total: int, ratio: float) -> None:
        super().__init__(total)
        if not 0 < ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        self.kept = min(total, max(1, math.ceil(ratio * total)))

    def result(self) -> SearchResult:
        return SearchResult(self.kept, self.total, True, [])


class BinarySearch(PrefixSearch):
    """Shortest prefix the judge calls sufficient, assuming sufficiency is monotone in k.

    At most ceil(log2(total + 1)) probes. When no prefix is judged sufficient the full CoT is
    kept and the result says ``sufficient=False``.
    """

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self._lo, self._hi = 1, total
        self._best: int | None = None
        self._pending: int | None = None

    def next_probe(self) -> int | None:
        if self._pending is not None:
            return self._pending
        if self._lo > self._hi:
            return None
        self._pending = (self._lo + self._hi) // 2
        return self._pending

    def record(self, k: int, verdict: str, score: float | None = None) -> None:
        if k != self._pending:
            raise ValueError(f"verdict for k={k}, but the pending probe is {self._pending}")
        self._pending = None
        self.probes.append(Probe(k, verdict, score))
        if verdict == "ENOUGH":
            self._best = k
            self._hi = k - 1
        else:
            self._lo = k + 1

    def result(self) -> SearchResult:
        if self.next_probe() is not None:
            raise RuntimeError("the search is not finished")
        if self._best is None:
            return SearchResult(self.total, self.total, False, list(self.probes))
        return SearchResult(self._best, self.total, True, list(self.probes))


def max_probes(total: int) -> int:
    """The binary search's probe bound for ``total`` sentences."""
    return math.ceil(math.log2(total + 1))


def make_search(strategy: str, total: int, ratio: float = 0.25) -> PrefixSearch:
    if strategy == "binary":
        return BinarySearch(total)
    if strategy == "full":
        return FullSearch(total)
    if strategy == "fixed_ratio":
        return FixedRatioSearch(total, ratio)
    raise ValueError(f"unknown strategy {strategy!r}")
