"""Verified prefixes (``truncate.verify``): check the judge's choice by letting the student try.

The paper's search trusts the student's own verdict that a prefix is enough; it names a
misjudged prefix as the method's weakness. With ``truncate.verify`` set, once a row's binary
search ends on a sufficient prefix, the student continues that prefix ``samples`` times (the
align prompt, graded as align grades: the continuation's answer, else the prefix's). Where
fewer than ``min_pass`` of them reach the gold answer, the prefix grows by ``step`` of the
CoT's sentences and the student tries again, at most ``max_moves`` times and never past the
whole CoT. It is off by default: the paper's method is the default, and verifying costs up to
``samples x (max_moves + 1)`` student generations per row on top of the search's one-token
verdicts.

What a row's record says (``verify``): ``{samples, min_pass, search_k, moves: [{k, passed,
of}], final_k, passed, tokens}``: ``moves`` holds each check in order, the first at the
search's prefix (``search_k``), so a row moved ``len(moves) - 1`` times; ``final_k`` is the
prefix the record keeps (its prefix fields describe it) and ``passed`` whether it met
``min_pass``; ``tokens`` the rollouts' generated tokens. A row the check cannot apply to
records ``{skipped: reason}`` (no sufficient prefix found; no gold answer).

:func:`rollouts` (K graded continuations of one prefix) is shared with the judge audit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from palign.config import SamplingConfig, Strict
from palign.engines.base import Engine, Sampling
from palign.method.grading import ExtractMode, Grader
from palign.method.prompts import align_chat
from palign.method.segment import prefix
from palign.stages.align import gold_of, grade_ending
from palign.stages.generate import sampling_for


class VerifyConfig(Strict):
    """``truncate.verify``: the student's rollouts that confirm (or move) a searched prefix."""

    samples: int = Field(
        default=4, ge=1,
        description="K: continuations the student writes from a prefix to check it.")
    min_pass: float = Field(
        default=0.5, gt=0, le=1,
        description="tau: the share of the K continuations that must reach the gold answer "
                    "for the prefix to stand; under it the prefix grows.")
    max_moves: int = Field(
        default=3, ge=0,
        description="Most times a row's prefix grows before verification gives up (the "
                    "record says passed: false and keeps the last prefix tried); 0: check "
                    "and record only.")
    step: float = Field(
        default=0.1, gt=0, le=1,
        description="How much a move adds: this share of the CoT's sentences, rounded up, "
                    "at least one sentence.")
    sampling: SamplingConfig = Field(
        default=SamplingConfig(),
        description="How the student continues (as align.sampling by default); rollout i "
                    "of a row is seeded seed + i, so no two of a row's rollouts are alike.")
    extract: Literal["strict", "flexible"] = Field(
        default="strict",
        description="How a rollout's answer is found, as align.extract: strict, its last "
                    "\\boxed{}; flexible, math-verify's own extraction.")
    gold: Literal["answer", "solution"] = Field(
        default="answer",
        description="What the data's answer column holds, as align.gold: answer, the final "
                    "answer; solution, a worked solution whose final answer is found.")
    grade_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Seconds per answer check; past it the rollout counts as wrong.")


@dataclass(frozen=True)
class Rollout:
    """One continuation of a prefix and its grade. ``source``: where the graded answer was
    found (continuation, prefix: the prefix already held it, or None: no answer)."""

    passed: bool
    status: str  # the grade's status (ok, no_answer, timeout, ...), or "error"
    predicted: str | None
    source: str | None
    seed: int | None
    tokens: int  # generated
    prompt_tokens: int
    error: str | None = None


def seed_at(sampling: Sampling, n: int) -> Sampling:
    """``sampling`` for a row's n-th rollout: seed + n (unseeded stays unseeded)."""
    return sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + n)


async def rollouts(engine: Engine, grader: Grader, question: str, draft: str, gold: str,
                   samples: int, sampling: Sampling, extract: ExtractMode = "strict"
                   ) -> list[Rollout]:
    """The student continues ``draft`` ``samples`` times (align's prompt), each graded
    against ``gold`` as align grades a target. Rollout i is seeded ``sampling.seed + i``: a
    caller that rolls out one row several times offsets ``sampling.seed`` so no seed repeats.
    The continuations run concurrently on the engine; grading (a blocking call to the grading
    worker) runs off the event loop. An engine error is that rollout's ``error``, never a
    raise (the caller decides what it means)."""
    chat = align_chat(question, draft)
    plans = [seed_at(sampling, i) for i in range(samples)]
    done = await asyncio.gather(*(engine.agenerate(chat, s) for s in plans))
    out = []
    for s, comp in zip(plans, done):
        if comp.error:
            out.append(Rollout(False, "error", None, None, s.seed, comp.completion_tokens,
                               comp.prompt_tokens, comp.error))
            continue
        grade, source = await asyncio.to_thread(grade_ending, grader, draft, comp.text, gold,
                                                extract)
        out.append(Rollout(grade.correct, grade.status, grade.predicted, source, s.seed,
                           comp.completion_tokens, comp.prompt_tokens))
    return out


@dataclass
class Verified:
    """What verification made of one row: the sentences to keep, its record, or the error
    that rejects the row (a rollout the engine could not write)."""

    final_k: int
    record: dict[str, Any]
    error: str | None = None


def move_size(cfg: VerifyConfig, total: int) -> int:
    """Sentences one move adds: ``step`` of the CoT, rounded up, at least one."""
    return max(1, math.ceil(cfg.step * total))


async def verify_prefix(engine: Engine, grader: Grader, row: dict[str, Any],
                        ends: Sequence[int], search_k: int, sufficient: bool,
                        cfg: VerifyConfig) -> Verified:
    """Check the searched prefix (``search_k`` sentences of ``row``'s CoT, whose sentence
    ends are ``ends``) by rollouts, moving it forward while fewer than ``min_pass`` pass."""
    if not sufficient:
        return Verified(search_k, {"skipped": "the search found no sufficient prefix (the "
                                              "whole CoT is kept)"})
    if row.get("answer") is None:
        return Verified(search_k, {"skipped": "no gold answer to grade the rollouts against"})
    gold, _ = await asyncio.to_thread(gold_of, row, grader, cfg.gold)
    if gold is None:
        return Verified(search_k, {"skipped": "no final answer found in the gold solution"})
    total, sampling = len(ends), sampling_for(cfg)
    k, used, tokens, passed = search_k, 0, 0, False
    moves: list[dict[str, int]] = []
    while True:
        tried = await rollouts(engine, grader, row["question"], prefix(row["cot"], ends, k),
                               gold, cfg.samples, seed_at(sampling, used), cfg.extract)
        used += cfg.samples
        tokens += sum(r.tokens for r in tried)
        failed = next((r.error for r in tried if r.error), None)
        if failed:
            return Verified(k, {}, f"verify rollout at k={k}: {failed}")
        good = sum(r.passed for r in tried)
        moves.append({"k": k, "passed": good, "of": cfg.samples})
        passed = good / cfg.samples >= cfg.min_pass
        if passed or len(moves) > cfg.max_moves or k >= total:
            break
        k = min(total, k + move_size(cfg, total))
    return Verified(k, {"samples": cfg.samples, "min_pass": cfg.min_pass, "search_k": search_k,
                        "moves": moves, "final_k": k, "passed": passed, "tokens": tokens})


def verify_index(record: dict[str, Any]) -> dict[str, Any]:
    """A truncate record's index columns for verification: the moves made and whether the
    final prefix passed (both None where verification was off or skipped)."""
    verify = record.get("verify")
    if not isinstance(verify, dict) or "moves" not in verify:
        return {"verify_moves": None, "verified": None}
    return {"verify_moves": len(verify["moves"]) - 1, "verified": bool(verify["passed"])}


def verify_stats(moves: Sequence[Any], verified: Sequence[Any]) -> dict[str, float]:
    """Over the rows verification checked: the share whose prefix moved, the share that never
    passed, and the mean moves per checked row; nothing where none was checked."""
    checked = [(int(m), bool(v)) for m, v in zip(moves, verified)
               if m is not None and m == m and v is not None and v == v]  # not NaN
    if not checked:
        return {}
    n = len(checked)
    return {"verify_moved_share": sum(m > 0 for m, _ in checked) / n,
            "verify_failed_share": sum(not v for _, v in checked) / n,
            "mean_verify_moves": sum(m for m, _ in checked) / n}
