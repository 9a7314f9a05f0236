"""Judge verdicts: parsed from generated text, or decided from the two labels' scores."""

from __future__ import annotations

import math
import re

ENOUGH = "ENOUGH"
NOT_ENOUGH = "NOT_ENOUGH"
UNPARSED = "UNPARSED"  # the reply named neither label; the search treats it as NOT_ENOUGH
LABELS = (ENOUGH, NOT_ENOUGH)

# "NOT_ENOUGH" written loosely: "not enough", "Not-Enough", "NOTENOUGH", "not  enough".
_NEGATIVE = re.compile(r"\bNOT[\s_\-]*ENOUGH\b|\bINSUFFICIENT\b")
_POSITIVE = re.compile(r"\bENOUGH\b|\bSUFFICIENT\b")


def parse_verdict(reply: str) -> str:
    """The first label a noisy reply names; markdown, case and punctuation are ignored."""
    text = re.sub(r"[*`#>\"']", " ", reply).upper()
    neg = _NEGATIVE.search(text)
    pos = _POSITIVE.search(text)
    if neg and (pos is None or neg.start() <= pos.start()):
        return NOT_ENOUGH
    if pos:
        return ENOUGH
    return UNPARSED


def enough_probability(logprob_enough: float, logprob_not: float) -> float:
    """P(ENOUGH) with the two labels renormalised against each other."""
    if math.isinf(logprob_enough) and math.isinf(logprob_not):
        return 0.5
    top = max(logprob_enough, logprob_not)
    a = math.exp(logprob_enough - top)
    b = math.exp(logprob_not - top)
    return a / (a + b)


def verdict_from_score(p_enough: float, threshold: float) -> str:
    return ENOUGH if p_enough >= threshold else NOT_ENOUGH
