"""truncate: the adaptive prefix search, many examples at once, the student as judge.

All searches of a batch advance together: each round gathers every pending probe and judges
them in ONE engine call, so the number of engine calls per batch is the longest search's probe
count (about log2 of the sentence count), never the number of examples.

Output row: the input record plus prefix, prefix_offset, sentences_kept, sentences_total,
prefix_ratio, sufficient, probes [{k, verdict, score}], strategy, and the judge's prompt tokens
(judge_prompt_tokens) and how many of them the engine's prefix cache served
(judge_cached_tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from palign.config import TruncateSection
from palign.engines.base import Engine, Sampling
from palign.prompts import judge_chat
from palign.search import PrefixSearch, make_search
from palign.segment import prefix, sentence_ends
from palign.stages.definition import BatchMetrics, Row, Stage
from palign.stages.outcome import Outcome, rejected
from palign.verdict import (
    LABELS,
    NOT_ENOUGH,
    enough_probability,
    parse_verdict,
    verdict_from_score,
)


class _InFlight:
    def __init__(self, row: dict[str, Any], ends: list[int], search: PrefixSearch) -> None:
        self.row = row
        self.ends = ends
        self.search = search
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.error: str | None = None

    def pending(self) -> int | None:
        return None if self.error else self.search.next_probe()


def judge_round(
    engine: Engine, chats: list[list[dict[str, str]]], cfg: TruncateSection
) -> list[tuple[str, float | None, int, int, str | None]]:
    """One batched engine call: (verdict, score, prompt tokens, cached tokens, error) each."""
    if cfg.verdict == "score":
        scores = engine.score_labels(chats, list(LABELS))
        out = []
        for s in scores:
            if s.error:
                out.append((NOT_ENOUGH, None, s.prompt_tokens, s.cached_tokens, s.error))
                continue
            p = enough_probability(s.logprobs[LABELS[0]], s.logprobs[LABELS[1]])
            out.append((verdict_from_score(p, cfg.threshold), p, s.prompt_tokens,
                        s.cached_tokens, None))
        return out
    sampling = Sampling(max_tokens=cfg.judge_max_tokens, temperature=0.0)
    return [
        (parse_verdict(c.text), None, c.prompt_tokens, c.cached_tokens, c.error)
        for c in engine.generate(chats, sampling)
    ]


def truncate_rows(
    rows: list[dict[str, Any]], engine: Engine | None, cfg: TruncateSection
) -> tuple[list[Outcome], int]:
    """Search every row's prefix; returns the outcomes and the number of engine calls made."""
    outcomes: dict[int, Outcome] = {}
    flights: dict[int, _InFlight] = {}
    for i, row in enumerate(rows):
        cot = row.get("cot")
        if not isinstance(cot, str) or not cot.strip():
            outcomes[i] = rejected(row, "no CoT to truncate (add the generate stage or a CoT)")
            continue
        ends = sentence_ends(cot)
        flights[i] = _InFlight(row, ends, make_search(cfg.strategy, len(ends), cfg.ratio))

    calls = 0
    while True:
        wave = [(i, f.pending()) for i, f in flights.items()]
        wave = [(i, k) for i, k in wave if k is not None]
        if not wave:
            break
        if engine is None:
            raise RuntimeError(f"strategy {cfg.strategy!r} needs a judge engine")
        chats = []
        for i, k in wave:
            f = flights[i]
            chats.append(judge_chat(f.row["question"], prefix(f.row["cot"], f.ends, k)))
        calls += 1
        for (i, k), (verdict, score, ptok, ctok, err) in zip(wave, judge_round(engine, chats, cfg)):
            f = flights[i]
            f.prompt_tokens += ptok
            f.cached_tokens += ctok
            if err:
                f.error = f"judge at k={k}: {err}"
            else:
                f.search.record(k, verdict, score)

    for i, f in flights.items():
        if f.error:
            outcomes[i] = rejected(f.row, f.error)
            continue
        res = f.search.result()
        offset = f.ends[res.kept - 1]
        cot = f.row["cot"]
        outcomes[i] = Outcome(f.row["id"], {
            **f.row,
            "prefix": cot[:offset],
            "prefix_offset": offset,
            "sentences_kept": res.kept,
            "sentences_total": res.total,
            "prefix_ratio": offset / len(cot),
            "sufficient": res.sufficient,
            "probes": [asdict(p) for p in res.probes],
            "strategy": cfg.strategy,
            "judge_prompt_tokens": f.prompt_tokens,
            "judge_cached_tokens": f.cached_tokens,
        })
    return [outcomes[i] for i in range(len(rows))], calls


def batch_metrics(records: Sequence[Row]) -> BatchMetrics:
    """Judge prompt tokens (its verdicts are one-token reads), probes and prefix ratios."""
    return BatchMetrics(
        tokens=sum(int(r.get("judge_prompt_tokens") or 0) for r in records),
        probes=sum(len(r.get("probes") or ()) for r in records),
        ratios=tuple(float(r["prefix_ratio"]) for r in records
                     if isinstance(r.get("prefix_ratio"), (float, int))))


def index_entry(record: Row) -> dict[str, Any]:
    """What the index keeps of a truncated row: its ratios, probes, verdict and judge tokens."""
    total = record.get("sentences_total") or 0
    return {"prefix_ratio": record.get("prefix_ratio"),
            "sentence_ratio": record.get("sentences_kept", 0) / total if total else None,
            "probes": len(record.get("probes") or ()),
            "sufficient": bool(record.get("sufficient")),
            "judge_prompt_tokens": int(record.get("judge_prompt_tokens") or 0),
            "judge_cached_tokens": int(record.get("judge_cached_tokens") or 0)}


def summary_stats(columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Means over the finished rows: prefix and sentence ratios, probes per example, the share
    judged sufficient, and the share of judge prompt tokens served from the prefix cache."""
    n = len(columns.get("prefix_ratio", ()))
    if not n:
        return {}
    ptok = sum(columns["judge_prompt_tokens"])
    ctok = sum(columns["judge_cached_tokens"])
    sentence = [v for v in columns["sentence_ratio"] if v is not None and v == v]  # not NaN
    return {
        "mean_prefix_ratio": float(sum(columns["prefix_ratio"])) / n,
        "mean_sentence_ratio": float(sum(sentence)) / len(sentence) if sentence else 0.0,
        "probes_per_example": float(sum(columns["probes"])) / n,
        "sufficient_share": sum(bool(v) for v in columns["sufficient"]) / n,
        "prompt_cache_share": float(ctok / ptok) if ptok else 0.0,
    }


TRUNCATE = Stage(
    name="truncate",
    model=lambda cfg: cfg.judge_model,
    needs_engine=lambda cfg: cfg.truncate.strategy == "binary",
    process=lambda rows, engine, grader, section: truncate_rows(rows, engine, section),
    metrics=batch_metrics,
    index=index_entry,
    index_columns=("prefix_ratio", "sentence_ratio", "probes", "sufficient",
                   "judge_prompt_tokens", "judge_cached_tokens"),
    stats=summary_stats,
)
