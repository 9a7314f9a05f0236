"""The judge audit's stage (``palign audit``): a row's whole P(ENOUGH) curve, the binary search
replayed on it, and the student's real chance of finishing from a few of its prefixes.

Not a pipeline stage: it is in no ``run.stages`` list and has no section in a run's YAML. The
audit's driver (``palign.runtime.audit``) builds its :class:`AuditSection` from copies of the
run's own ``truncate`` and ``align`` sections, so the judge prompt, threshold, verdict mode,
sampling, gold and extraction are exactly what the run uses, and runs it on a sample through
the real runner (``WorkerSpec.for_tool``).

Each row is one coroutine, as truncate's per-row search is: it is admitted with its longest
judge prompt reserved, probes the grid (``method.audit.probe_grid``) in ascending k with
truncate's own ``judge_one`` (so the engine's prefix cache serves each probe the earlier ones'
tokens), probes the few k binary search needs off the grid, then rolls the student out
``rollouts`` times at each of ``points`` prefixes (``verify.rollouts``; every sample of a row
has its own seed: the default ``sampling.seed`` 0 would give K identical samples), graded as
align grades. Its record is the audit row (``AuditRow.to_record``) plus the judge's tokens.

``phase`` splits the work where the judge is not the student (two engines): ``curves`` probes
only and keeps the input row beside its audit, ``rollouts`` reads those records and rolls out;
``both`` (the judge is the student) does it all on one engine. A row with no CoT, or one whose
probe or rollout the engine could not serve (a prompt over the context), is a row reject.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from palign.config import EngineStageSection
from palign.engines.base import Engine
from palign.method.audit import (
    AuditRow,
    Rollout,
    audit_row,
    next_missing,
    probe_grid,
    rollout_points,
    with_rollouts,
)
from palign.method.prompts import judge_chat
from palign.method.search import Probe
from palign.method.segment import prefix, sentence_ends
from palign.stages.align import AlignSection, gold_of
from palign.stages.base import BatchMetrics, Context, Outcome, Row, RowStage, rejected
from palign.stages.generate import sampling_for
from palign.stages.truncate import TruncateSection, judge_one
from palign.stages.verify import rollouts as roll_out
from palign.stages.verify import seed_at

Phase = Literal["both", "curves", "rollouts"]
AUDIT_KEY = "audit"  # a curves-phase record: the input row, with its audit under this key


class AuditSection(EngineStageSection):
    """The audit's settings: the run's truncate and align sections (copied by the driver) and
    how much to probe and roll out. ``engine`` is the engine this pool serves: truncate's when
    it judges, align's for a rollouts-only phase."""

    truncate: TruncateSection = Field(
        default=TruncateSection(),
        description="The run's truncate section: the judge's verdict mode, threshold and "
                    "engine, as truncate runs them.")
    align: AlignSection = Field(
        default=AlignSection(),
        description="The run's align section: how the student continues a prefix (sampling) "
                    "and how a continuation is graded (gold, extract, grade_timeout_s).")
    max_probes: int = Field(
        default=64, ge=2,
        description="Prefix lengths probed per row: every k on a CoT of at most this many "
                    "sentences, else this many evenly spread ones (1 and the whole CoT among "
                    "them), plus the few binary search needs off that grid.")
    rollouts: int = Field(
        default=4, ge=1,
        description="K: continuations the student writes from each rollout point.")
    points: int = Field(
        default=3, ge=1,
        description="Rollout points per row: binary search's prefix, the scan's, then a "
                    "quarter, half and all of the CoT, at most this many.")
    phase: Phase = Field(
        default="both",
        description="both: probe and roll out on one engine (the judge is the student); "
                    "curves: probe only; rollouts: roll out from a curves phase's records.")


class _Probing:
    """One row's probes: the grid, then what binary search needs off it."""

    def __init__(self, row: Row, ends: list[int]) -> None:
        self.row = row
        self.ends = ends
        self.known: dict[int, Probe] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def chat(self, k: int) -> list[dict[str, str]]:
        return judge_chat(self.row["question"], prefix(self.row["cot"], self.ends, k))

    async def probe(self, engine: Engine, k: int, cfg: TruncateSection) -> str | None:
        """Judge the prefix of k sentences; the error that rejects the row, if any."""
        verdict, score, ptok, ctok, err = await judge_one(engine, self.chat(k), cfg)
        self.prompt_tokens += ptok
        self.cached_tokens += ctok
        if err:
            return f"judge at k={k}: {err}"
        self.known[k] = Probe(k, verdict, score)
        return None


async def curve_of(engine: Engine, row: Row, ends: list[int], cfg: AuditSection
                   ) -> tuple[AuditRow | None, dict[str, Any], str | None]:
    """The row's audit without rollouts, its judge token counts, or the error that rejects it.
    The grid goes in ascending k, one probe at a time (each reuses the last one's cached
    prefix); then each k binary search asks for that the grid lacks."""
    m = len(ends)
    probing = _Probing(row, ends)
    for k in probe_grid(m, cfg.max_probes):
        if err := await probing.probe(engine, k, cfg.truncate):
            return None, {}, err
    while (k := next_missing(m, probing.known)) is not None:
        if err := await probing.probe(engine, k, cfg.truncate):
            return None, {}, err
    audit = audit_row(str(row["id"]), m, cfg.truncate.threshold, cfg.truncate.verdict,
                      probing.known.values())
    tokens = {"judge_prompt_tokens": probing.prompt_tokens,
              "judge_cached_tokens": probing.cached_tokens}
    return audit, tokens, None


async def rollouts_of(engine: Engine, grader: Any, row: Row, ends: list[int],
                      audit: AuditRow, cfg: AuditSection
                      ) -> tuple[list[Rollout], str | None, str | None]:
    """(rollouts, why there are none, the error that rejects the row). Rollout point i's
    samples are seeded ``seed + i*K .. seed + i*K + K-1``: no seed repeats within a row."""
    if row.get("answer") is None:
        return [], "no gold answer to grade the rollouts against", None
    gold, _ = await asyncio.to_thread(gold_of, row, grader, cfg.align.gold)
    if gold is None:
        return [], "no final answer found in the gold solution", None
    m = len(ends)
    ks = rollout_points(m, audit.binary_k, audit.scan_k, cfg.points,
                        [p.k for p in audit.curve])
    sampling = sampling_for(cfg.align)
    tried = await asyncio.gather(*(
        roll_out(engine, grader, row["question"], prefix(row["cot"], ends, k), gold,
                 cfg.rollouts, seed_at(sampling, i * cfg.rollouts), cfg.align.extract)
        for i, k in enumerate(ks)))
    out = []
    for k, samples in zip(ks, tried):
        failed = next((s.error for s in samples if s.error), None)
        if failed:
            return [], None, f"rollout at k={k}: {failed}"
        out.append(Rollout(k, len(samples), sum(s.passed for s in samples),
                           sum(s.passed and s.source == "prefix" for s in samples),
                           sum(s.tokens for s in samples)))
    return out, None, None


async def audit_one(engine: Engine, grader: Any, row: Row, cfg: AuditSection) -> Outcome:
    """One row's audit, under the phase ``cfg.phase`` (see the module's docstring)."""
    source = row.get(AUDIT_KEY) if cfg.phase == "rollouts" else None
    if cfg.phase == "rollouts" and not isinstance(source, Mapping):
        return rejected(row, "no curve to roll out from (run the curves phase first)")
    cot = row.get("cot")
    if not isinstance(cot, str) or not cot.strip():
        return rejected(row, "no CoT to audit (add the generate stage or a CoT)")
    ends = sentence_ends(cot)
    reserved = await engine.admit(judge_chat(row["question"], cot[:ends[-1]]))
    try:
        if source is not None:
            audit = AuditRow.from_record(source)
            tokens = {k: source.get(k, 0) for k in ("judge_prompt_tokens",
                                                    "judge_cached_tokens")}
        else:
            found, tokens, err = await curve_of(engine, row, ends, cfg)
            if err or found is None:
                return rejected(row, err or "no curve")
            audit = found
        if cfg.phase == "curves":
            return Outcome(str(row["id"]), {**row, AUDIT_KEY: {**audit.to_record(), **tokens}})
        done, skipped, err = await rollouts_of(engine, grader, row, ends, audit, cfg)
        if err:
            return rejected(row, err)
    finally:
        engine.release(reserved)
    record = {**with_rollouts(audit, done).to_record(), **tokens}
    if skipped:
        record["rollouts_skipped"] = skipped
    return Outcome(audit.id, record)


class Audit(RowStage):
    """The judge audit on one engine pool (``palign audit``); registered nowhere: its driver
    names it by import path (``STAGE_CLASS``)."""

    name = "audit"
    description = "The judge audit: P(ENOUGH) curves, binary search replayed, rollouts."
    Section = AuditSection
    index_columns = ("probes", "breaks", "binary_differs", "rollout_samples")

    def needs_grader(self, section: Any) -> bool:
        return section.phase != "curves"

    def grade_timeout(self, section: Any) -> float:
        return float(section.align.grade_timeout_s)

    def output_budget(self, section: Any) -> tuple[str, int | None] | None:
        if section.phase == "curves":
            return "truncate.judge_max_tokens", 1
        return "align.sampling.max_tokens", section.align.sampling.max_tokens

    async def process_row(self, row: Row, ctx: Context) -> Outcome:
        if ctx.engine is None:
            raise RuntimeError("the audit needs an engine (the judge and the student)")
        return await audit_one(ctx.engine, ctx.grader, row, ctx.section)

    def metrics(self, records: Sequence[Row]) -> BatchMetrics:
        """The judge's prompt tokens and the rollouts' generated ones, and the probes."""
        audits = [r.get(AUDIT_KEY, r) for r in records]
        return BatchMetrics(
            tokens=sum(int(a.get("judge_prompt_tokens") or 0)
                       + sum(int(x.get("tokens") or 0) for x in a.get("rollouts") or ())
                       for a in audits),
            probes=sum(len(a.get("curve") or ()) for a in audits))

    def index(self, record: Row) -> dict[str, Any]:
        audit = record.get(AUDIT_KEY, record)
        return {"probes": len(audit.get("curve") or ()),
                "breaks": len(audit.get("breaks") or ()),
                "binary_differs": audit.get("binary", {}).get("k") != audit.get("scan_k"),
                "rollout_samples": sum(int(r.get("n") or 0)
                                       for r in audit.get("rollouts") or ())}

    def stats(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        n = len(columns.get("probes", ()))
        if not n:
            return {}
        return {"probes_per_row": float(sum(columns["probes"])) / n,
                "breaks_per_row": float(sum(columns["breaks"])) / n,
                "binary_differs_share": sum(bool(v) for v in columns["binary_differs"]) / n,
                "rollout_samples": float(sum(columns["rollout_samples"]))}


STAGE_CLASS = f"{__name__}:{Audit.__name__}"
