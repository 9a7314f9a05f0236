"""truncate: the adaptive prefix search, many examples at once, the student as judge.

Two ways to drive the searches of a batch (``truncate.search``):

- ``per_row`` (default): each row's search is its own coroutine. Its probe k+1 goes to the engine
  the moment verdict k comes back, so one row's probes follow each other and its question and
  CoT stay in the engine's prefix cache between them; rows finish independently, and the engine
  (shared by the actor's batches in flight, ``palign.engines.server``) is kept full by the other
  batches' rows meanwhile.
- ``lockstep``: all searches of a batch advance in rounds; each round gathers every pending
  probe and judges them in ONE engine call (engine calls per batch = the longest search's probe
  count). Every round revisits every row, so with a KV cache smaller than the batch's CoTs the
  cache has evicted a row's prefix by its next probe. It stays, opt-in only, for two users:
  ``benchmarks/judge_throughput.py --cache`` measures that eviction against ``per_row``, and the
  tests use it as the per-row search's oracle. It calls only ``generate`` / ``score_labels``,
  so it also runs on a bare backend, with no engine server.

Both take the same probes in the same order per row (the search state machine is the same), so
with a deterministic engine they choose the same prefixes.

Output row: the input record plus prefix, prefix_offset, sentences_kept, sentences_total,
prefix_ratio, sufficient, probes [{k, verdict, score}], strategy, and the judge's prompt tokens
(judge_prompt_tokens) how many of them the engine's prefix cache served
(judge_cached_tokens), and the longest single judge prompt (judge_longest_prompt_tokens): prompt
minus cached tokens over it is the prefill work the row cost, relative to its prompt.

With ``truncate.verify`` set (off by default; ``palign.stages.verify``), the student's graded
rollouts check each searched prefix and may move it forward: the record then also holds
``verify`` (what happened), and its prefix fields describe the final prefix, not the searched
one (``verify.search_k`` keeps that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

from pydantic import Field

from palign.config import Config, EngineStageSection
from palign.engines.base import Batched, Completion, Engine, LabelScores, Sampling
from palign.method.prompts import judge_chat
from palign.method.search import PrefixSearch, make_search
from palign.method.segment import prefix, sentence_ends
from palign.method.verdict import (
    LABELS,
    NOT_ENOUGH,
    enough_probability,
    parse_verdict,
    verdict_from_score,
)
from palign.stages.base import BatchMetrics, Context, Outcome, Row, Stage, rejected
from palign.stages.verify import VerifyConfig, verify_index, verify_prefix, verify_stats


class TruncateSection(EngineStageSection):
    strategy: Literal["binary", "full", "fixed_ratio"] = Field(
        default="binary",
        description="binary: search for the shortest prefix the judge calls enough; full: "
                    "keep the whole CoT; fixed_ratio: keep a fixed share of the sentences.")
    ratio: float = Field(
        default=0.25, gt=0, le=1,
        description="fixed_ratio: the share of the CoT's sentences kept.")
    verdict: Literal["generate", "score"] = Field(
        default="score",
        description="How the judge answers: score compares the two labels' probabilities; "
                    "generate parses a short greedy reply.")
    threshold: float = Field(
        default=0.5, gt=0, lt=1,
        description="score: the probability of ENOUGH needed to call a prefix enough.")
    judge_max_tokens: int = Field(
        default=16, ge=1, description="generate: tokens the judge may write per verdict.")
    search: Literal["per_row", "lockstep"] = Field(
        default="per_row",
        description="per_row: each row's search runs on its own, probe after probe (keeps "
                    "its prefix cached); lockstep: a batch's searches advance in rounds, one "
                    "engine call per round.")
    verify: VerifyConfig | None = Field(
        default=None,
        description="Verified prefixes (off by default: the paper trusts the judge): the "
                    "student continues each searched prefix K times, graded; where fewer "
                    "than min_pass reach the gold answer, the prefix grows, a bounded number "
                    "of times. Needs strategy binary, search per_row and the student as "
                    "judge.")


class _InFlight:
    def __init__(self, row: dict[str, Any], ends: list[int], search: PrefixSearch) -> None:
        self.row = row
        self.ends = ends
        self.search = search
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.longest_prompt = 0
        self.error: str | None = None
        self.final_k: int | None = None  # the prefix verification kept (None: the searched)
        self.verify: dict[str, Any] | None = None  # the verify record, when it is on

    def pending(self) -> int | None:
        return None if self.error else self.search.next_probe()

    def chat(self, k: int) -> list[dict[str, str]]:
        return judge_chat(self.row["question"], prefix(self.row["cot"], self.ends, k))

    def take(self, k: int, judged: Judged) -> None:
        verdict, score, ptok, ctok, err = judged
        self.prompt_tokens += ptok
        self.cached_tokens += ctok
        self.longest_prompt = max(self.longest_prompt, ptok)
        if err:
            self.error = f"judge at k={k}: {err}"
        else:
            self.search.record(k, verdict, score)


Judged = tuple[str, float | None, int, int, str | None]  # verdict, score, ptok, cached, error


def _from_scores(s: LabelScores, cfg: TruncateSection) -> Judged:
    if s.error:
        return (NOT_ENOUGH, None, s.prompt_tokens, s.cached_tokens, s.error)
    p = enough_probability(s.logprobs[LABELS[0]], s.logprobs[LABELS[1]])
    return (verdict_from_score(p, cfg.threshold), p, s.prompt_tokens, s.cached_tokens, None)


def _from_text(c: Completion) -> Judged:
    return (parse_verdict(c.text), None, c.prompt_tokens, c.cached_tokens, c.error)


def _judge_sampling(cfg: TruncateSection) -> Sampling:
    return Sampling(max_tokens=cfg.judge_max_tokens, temperature=0.0)


def judge_round(engine: Batched, chats: list[list[dict[str, str]]],
                cfg: TruncateSection) -> list[Judged]:
    """One batched engine call: (verdict, score, prompt tokens, cached tokens, error) each."""
    if cfg.verdict == "score":
        return [_from_scores(s, cfg) for s in engine.score_labels(chats, list(LABELS))]
    return [_from_text(c) for c in engine.generate(chats, _judge_sampling(cfg))]


async def judge_one(engine: Engine, chat: list[dict[str, str]], cfg: TruncateSection) -> Judged:
    """One probe, awaited: the engine answers it as soon as it is done."""
    if cfg.verdict == "score":
        return _from_scores(await engine.ascore_labels(chat, list(LABELS)), cfg)
    return _from_text(await engine.agenerate(chat, _judge_sampling(cfg)))


async def _search_row(engine: Engine, f: _InFlight, cfg: TruncateSection,
                      grader: Any = None) -> None:
    """One row's whole search, probe after probe, then (``truncate.verify``) its rollouts.
    The row is first admitted with its longest judge prompt (the whole CoT) reserved in the
    engine's KV cache, so that the rows searching together fit in it and keep their prefixes
    cached."""
    reserved = await engine.admit(f.chat(f.search.total))
    try:
        while (k := f.pending()) is not None:
            f.take(k, await judge_one(engine, f.chat(k), cfg))
        if cfg.verify is not None and not f.error:
            res = f.search.result()
            done = await verify_prefix(engine, grader, f.row, f.ends, res.kept,
                                       res.sufficient, cfg.verify)
            f.final_k, f.verify, f.error = done.final_k, done.record, done.error
    finally:
        engine.release(reserved)


async def _search_rows(engine: Engine, flights: list[_InFlight], cfg: TruncateSection,
                       grader: Any = None) -> None:
    # Every row at once: the engine server bounds what is in flight (engine.max_in_flight).
    # A machinery failure of one probe ends them all (the worker hands it to Ray).
    await asyncio.gather(*(_search_row(engine, f, cfg, grader) for f in flights))


def _lockstep(flights: dict[int, _InFlight], engine: Batched | None,
              cfg: TruncateSection) -> None:
    while True:
        wave = [(i, f.pending()) for i, f in flights.items()]
        wave = [(i, k) for i, k in wave if k is not None]
        if not wave:
            return
        if engine is None:
            raise RuntimeError(f"strategy {cfg.strategy!r} needs a judge engine")
        chats = [flights[i].chat(k) for i, k in wave]
        for (i, k), judged in zip(wave, judge_round(engine, chats, cfg)):
            flights[i].take(k, judged)


def truncate_rows(
    rows: list[dict[str, Any]], engine: Engine | None, cfg: TruncateSection,
    grader: Any = None,
) -> list[Outcome]:
    """Search every row's prefix; an outcome per row (its probes are in its record).
    ``cfg.search`` picks the driver: ``lockstep`` the rounds (any ``Batched`` engine will do),
    else each row its own coroutine. ``grader`` grades ``cfg.verify``'s rollouts (only then
    needed)."""
    if cfg.verify is not None and (cfg.search != "per_row" or cfg.strategy != "binary"
                                   or grader is None):
        raise RuntimeError("truncate.verify needs strategy binary, search per_row and a "
                           "grader")
    outcomes: dict[int, Outcome] = {}
    flights: dict[int, _InFlight] = {}
    for i, row in enumerate(rows):
        cot = row.get("cot")
        if not isinstance(cot, str) or not cot.strip():
            outcomes[i] = rejected(row, "no CoT to truncate (add the generate stage or a CoT)")
            continue
        ends = sentence_ends(cot)
        flights[i] = _InFlight(row, ends, make_search(cfg.strategy, len(ends), cfg.ratio))

    probing = [f for f in flights.values() if f.pending() is not None]
    if probing and engine is None:
        raise RuntimeError(f"strategy {cfg.strategy!r} needs a judge engine")
    if cfg.search == "lockstep":
        _lockstep(flights, engine, cfg)
    elif probing and engine is not None:
        asyncio.run(_search_rows(engine, probing, cfg, grader))

    for i, f in flights.items():
        if f.error:
            outcomes[i] = rejected(f.row, f.error)
            continue
        res = f.search.result()
        kept = f.final_k or res.kept
        offset = f.ends[kept - 1]
        cot = f.row["cot"]
        outcomes[i] = Outcome(f.row["id"], {
            **f.row,
            "prefix": cot[:offset],
            "prefix_offset": offset,
            "sentences_kept": kept,
            "sentences_total": res.total,
            "prefix_ratio": offset / len(cot),
            "sufficient": res.sufficient,
            "probes": [asdict(p) for p in res.probes],
            "strategy": cfg.strategy,
            "judge_prompt_tokens": f.prompt_tokens,
            "judge_cached_tokens": f.cached_tokens,
            "judge_longest_prompt_tokens": f.longest_prompt,
            **({"verify": f.verify} if f.verify is not None else {}),
        })
    return [outcomes[i] for i in range(len(rows))]


def batch_metrics(records: Sequence[Row]) -> BatchMetrics:
    """Judge prompt tokens (its verdicts are one-token reads) and the tokens verification's
    rollouts wrote, probes and prefix ratios."""
    return BatchMetrics(
        tokens=sum(int(r.get("judge_prompt_tokens") or 0)
                   + int((r.get("verify") or {}).get("tokens") or 0) for r in records),
        probes=sum(len(r.get("probes") or ()) for r in records),
        ratios=tuple(float(r["prefix_ratio"]) for r in records
                     if isinstance(r.get("prefix_ratio"), (float, int))),
        prefill=tuple(v for r in records if (v := prefill_ratio(r)) is not None))


def index_entry(record: Row) -> dict[str, Any]:
    """What the index keeps of a truncated row: its ratios, probes, verdict and judge tokens."""
    total = record.get("sentences_total") or 0
    return {"prefix_ratio": record.get("prefix_ratio"),
            "sentence_ratio": record.get("sentences_kept", 0) / total if total else None,
            "probes": len(record.get("probes") or ()),
            "sufficient": bool(record.get("sufficient")),
            "judge_prompt_tokens": int(record.get("judge_prompt_tokens") or 0),
            "judge_cached_tokens": int(record.get("judge_cached_tokens") or 0),
            "prefill_ratio": prefill_ratio(record), **verify_index(record)}


def prefill_ratio(record: Row) -> float | None:
    """Judge prompt tokens the engine computed (not served from its prefix cache), over the
    row's longest judge prompt: 1.0 when every probe found the earlier ones' tokens cached."""
    longest = int(record.get("judge_longest_prompt_tokens") or 0)
    if not longest:
        return None
    computed = int(record.get("judge_prompt_tokens") or 0) - int(
        record.get("judge_cached_tokens") or 0)
    return computed / longest


def summary_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Means over the finished rows: prefix and sentence ratios, probes per example, the share
    judged sufficient, and the share of judge prompt tokens served from the prefix cache; with
    ``truncate.verify``, the shares of checked rows moved and never passed, and mean moves."""
    n = len(columns.get("prefix_ratio", ()))
    if not n:
        return {}
    ptok = sum(columns["judge_prompt_tokens"])
    ctok = sum(columns["judge_cached_tokens"])
    sentence = [v for v in columns["sentence_ratio"] if v is not None and v == v]  # not NaN
    prefill = [v for v in columns.get("prefill_ratio", ()) if v is not None and v == v]
    return {
        "mean_prefix_ratio": float(sum(columns["prefix_ratio"])) / n,
        "mean_sentence_ratio": float(sum(sentence)) / len(sentence) if sentence else 0.0,
        "probes_per_example": float(sum(columns["probes"])) / n,
        "sufficient_share": sum(bool(v) for v in columns["sufficient"]) / n,
        "prompt_cache_share": float(ctok / ptok) if ptok else 0.0,
        "prefill_per_row": float(sum(prefill)) / len(prefill) if prefill else 0.0,
        **verify_stats(columns.get("verify_moves", ()), columns.get("verified", ())),
    }


class Truncate(Stage):
    """Its ``process`` is the whole batch's: ``truncate_rows`` runs each row's search as its
    own coroutine (``per_row``) or every row's in rounds (``lockstep``)."""

    name = "truncate"
    description = "The prefix search: the shortest CoT prefix the judge calls enough."
    Section = TruncateSection
    index_columns = ("prefix_ratio", "sentence_ratio", "probes", "sufficient",
                     "judge_prompt_tokens", "judge_cached_tokens", "prefill_ratio",
                     "verify_moves", "verified")

    def model(self, cfg: Config) -> str | None:
        return cfg.judge_model

    def needs_engine(self, cfg: Config) -> bool:
        return cfg.truncate.strategy == "binary"

    def models_used(self, cfg: Config) -> list[tuple[str, str]]:
        if not self.needs_engine(cfg):
            return []
        return [("models.judge" if cfg.models.judge else "models.student", cfg.judge_model)]

    def prompts(self) -> dict[str, Any]:
        return {"judge": judge_chat("{question}", "{prefix}"), "labels": list(LABELS)}

    def check(self, cfg: Config) -> list[str]:
        """``truncate.verify`` rolls the student out on the judge's engine, inside each row's
        own search: it needs that search (binary, per_row), and the judge to be the student."""
        t = cfg.truncate
        if t.verify is None:
            return []
        problems = [f"truncate.{name}: truncate.verify needs {need}, not {value!r}"
                    for name, value, need in (("strategy", t.strategy, "binary"),
                                              ("search", t.search, "per_row"))
                    if value != need]
        if cfg.judge_model != cfg.models.student:
            problems.append(f"models.judge: truncate.verify rolls the student out on the "
                            f"judge's engine, so the judge must be the student "
                            f"({cfg.models.student!r}), not {cfg.judge_model!r}")
        return problems

    def output_budget(self, section: Any) -> tuple[str, int | None] | None:
        if section.verify is not None:  # the rollouts write the longest outputs
            return "verify.sampling.max_tokens", section.verify.sampling.max_tokens
        # a score verdict reads one token's probabilities; a generated one may write more
        return ("judge_max_tokens",
                section.judge_max_tokens if section.verdict == "generate" else 1)

    def needs_grader(self, section: Any) -> bool:
        return section.verify is not None

    def grade_timeout(self, section: Any) -> float:
        return section.verify.grade_timeout_s if section.verify is not None else 5.0

    def process(self, rows: list[Row], ctx: Context) -> list[Outcome]:
        return truncate_rows(rows, ctx.engine, ctx.section, ctx.grader)

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        return batch_metrics(records)

    def index(self, record: Row) -> dict[str, Any]:
        return index_entry(record)

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        return summary_stats(columns)
