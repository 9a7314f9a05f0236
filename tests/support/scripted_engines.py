"""A judge and student whose answers the data scripts, named by import path in a test's config
(``truncate.engine.backend: "scripted_engines:ScriptedJudge"``); it loads no model.

Each CoT sentence may carry a marker ``[p 0.3 r 3/4]`` (``r`` optional; ``p`` a probability as
Python writes a float). Then:

- a judge prompt scored on its labels gets P(ENOUGH) = the opening's last ``p`` (0 without one),
  as label log-probabilities that ``palign.method.verdict.enough_probability`` maps back to
  ``scripted_score(p)``: p itself wherever the round trip through exp can reach it (0, 1/4, 1/2,
  0.3, 0.85, ...), else a float a few ulps away; a generated verdict says ENOUGH iff
  p >= ``engine_kwargs.threshold`` (0.5);
- an align prompt (a draft to continue) passes on its n-th sample (n = 0, 1, ...) iff
  ``n % D < R`` for the draft's last ``r R/D`` (none: never): it boxes the gold answer, written
  in the question as ``(answer 42)``, else ``\\boxed{-1}``. K samples with K a multiple of D
  pass exactly K*R/D times, in any order.
  The count is the engine's own (one per replica): a row's samples must all go to one engine,
  as they do when one worker handles the row.

Every request is recorded (``self.requests``, and as a JSON line in ``engine_kwargs.log`` when
given, since an engine in a Ray actor cannot be read from the test) with its effective seed
(``sampling.seed + index`` in its call, as vLLM seeds a batch), so tests can check that rollouts
were sampled with distinct seeds. ``tests/support/synthetic_rows.rows_with_curve`` writes such
rows.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from palign.engines.base import BackendBase, Chat, Completion, LabelScores, Sampling
from palign.method.verdict import ENOUGH, NOT_ENOUGH, enough_probability

MARKER = re.compile(r"\[p ([^\s\]]+)(?: r (\d+)/(\d+))?\]")
GOLD = re.compile(r"\(answer ([^)]*)\)")
OPENING, OPENING_END = "Opening of the solution:\n", "\n\nAnswer with one word"
DRAFT = "Draft:\n"
NEVER = -1e4  # a log-probability whose exp is 0.0 exactly (p = 0 or 1 stays finite)


def scripted_p(text: str) -> float:
    """The last marker's p in ``text``; 0 without a marker."""
    found = MARKER.findall(text)
    return float(found[-1][0]) if found else 0.0


def scripted_rate(text: str) -> tuple[int, int]:
    """The last marker's ``r R/D`` in ``text`` as (R, D); (0, 1) without one."""
    rates = [(int(r), int(d)) for _, r, d in MARKER.findall(text) if d]
    return rates[-1] if rates else (0, 1)


def label_logprobs(p: float) -> tuple[float, float]:
    """(log P(ENOUGH), log P(NOT_ENOUGH)) for which ``enough_probability`` gives ``p``: the
    smaller side is nudged ulp by ulp from log(p / (1 - p)) until the round trip is exact, so a
    threshold equal to p is met as the script means. Not every float is reachable (exp of a
    float skips some); then the closest reached, which ``scripted_score`` gives."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"scripted p {p} is not a probability")
    if p in (0.0, 1.0):
        return (0.0, NEVER) if p == 1.0 else (NEVER, 0.0)
    big = math.log(max(p, 1 - p))
    small = big + math.log(min(p, 1 - p) / max(p, 1 - p))

    def pair(x: float) -> tuple[float, float]:
        return (big, x) if p >= 0.5 else (x, big)

    best = small
    for direction in (math.inf, -math.inf):
        x = small
        for _ in range(64):
            got = enough_probability(*pair(x))
            if got == p:
                return pair(x)
            if abs(got - p) < abs(enough_probability(*pair(best)) - p):
                best = x
            x = math.nextafter(x, direction)
    return pair(best)


def scripted_score(p: float) -> float:
    """The P(ENOUGH) a judge prompt whose last marker says ``p`` gets, exactly."""
    return enough_probability(*label_logprobs(p))


def _content(chat: Chat) -> str:
    return "\n".join(m.get("content", "") for m in chat)


class ScriptedJudge(BackendBase):
    """The scripted judge and student (see the module's docstring); driven in batches."""

    name = "scripted"

    def __init__(self, spec: Any = None) -> None:
        kwargs = dict(getattr(spec, "engine_kwargs", None) or {})
        self.threshold = float(kwargs.get("threshold", 0.5))
        self.log_path: str | None = kwargs.get("log")
        self.requests: list[dict[str, Any]] = []
        self._samples: dict[str, int] = {}  # align prompt -> samples drawn so far
        self._lock = threading.Lock()

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        out = []
        for chat in chats:
            text = _content(chat)
            if OPENING not in text:
                out.append(LabelScores(error="scripted judge: not a judge prompt"))
                continue
            p = scripted_p(text.split(OPENING, 1)[1].split(OPENING_END)[0])
            lp = dict(zip((ENOUGH, NOT_ENOUGH), label_logprobs(p)))
            self._record({"kind": "score", "p": p})
            out.append(LabelScores({label: lp.get(label, NEVER) for label in labels},
                                   prompt_tokens=len(text.split())))
        return out

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        return [self._one(chat, None if sampling.seed is None else sampling.seed + i)
                for i, chat in enumerate(chats)]

    def _one(self, chat: Chat, seed: int | None) -> Completion:
        text = _content(chat)
        if OPENING in text:  # a generated verdict
            p = scripted_p(text.split(OPENING, 1)[1].split(OPENING_END)[0])
            self._record({"kind": "verdict", "p": p, "seed": seed})
            reply = ENOUGH if p >= self.threshold else "NOT_ENOUGH, an idea is missing"
            return self._done(text, reply)
        if DRAFT not in text:
            return Completion(error="scripted judge: neither a judge nor an align prompt",
                              finish_reason="error")
        draft = text.split(DRAFT, 1)[1]
        passes, of = scripted_rate(draft)
        with self._lock:
            n = self._samples.get(text, 0)
            self._samples[text] = n + 1
        gold = GOLD.search(text)
        passed = n % of < passes and gold is not None
        answer = gold.group(1) if passed and gold else "-1"
        self._record({"kind": "rollout", "seed": seed, "sample": n, "passed": passed,
                      "rate": [passes, of], "draft_end": draft[-60:]})
        return self._done(text, f"Going on from the draft (sample {n}), "
                                f"the answer is \\boxed{{{answer}}}.")

    def _done(self, prompt: str, reply: str) -> Completion:
        return Completion(reply, prompt_tokens=len(prompt.split()),
                          completion_tokens=len(reply.split()), finish_reason="stop")

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
