"""``palign audit CONFIG --sample N``: audit the judge on N rows of the truncate input.

The driver, under the run's lock:

1. takes truncate's input: the output of the stage before truncate where it has rows, else the
   ingested rows that have a CoT (ingesting first when needed), so it works before any stage
   has run;
2. samples N rows deterministically and cheaply at any scale: the input's shards are ranked by
   a hash of ``run.seed`` and their name and taken in that order until they hold N rows, then
   those shards' rows by a hash of their id. Only the indexes and the chosen shards are read;
3. clears ``<output_dir>/audit/`` and runs the audit stage (``palign.stages.audit``) on the
   sample through the real runner, in one engine pool when the judge is the student on the
   same engine settings (the paper's setup and the demo's); otherwise in two: the curves on
   truncate's engine and model (``models.judge``), then the rollouts on align's (the
   student), the second reading the first's records;
4. checks that every sampled row came out or was rejected, and writes the report
   (``palign.report.audit``: audit.json, audit.md, calibration.png, curves.png), with the
   audit's scores set against truncate's stored probes for the rows truncate has done.

docs/audit.md says how to read the report and what it costs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from palign.common.failures import MachineryError, StageFailed
from palign.config import Config, ConfigError, format_problems, load_config, stages_before
from palign.config.paths import absolute_paths
from palign.data import storage
from palign.data.digest import count_rows, read_index
from palign.data.layout import FILE, REJECTS, new_token
from palign.data.runlock import RunLock, RunLocked
from palign.data.shards import read_committed, read_rows, reject_reasons
from palign.report.audit import AUDIT_MD, AuditSettings, write_audit
from palign.runtime import signals
from palign.runtime.dataplane import Plan, plan
from palign.runtime.runner import StageError, ingest, prepare_output, run_planned
from palign.runtime.spec import WorkerSpec
from palign.runtime.summary import StageSummary, save_summary
from palign.stages.audit import STAGE_CLASS, AuditSection

log = logging.getLogger(__name__)

AUDIT = "audit"
CURVES, ROWS = "curves", "rows"  # audit/curves/ (two-pool audits only), audit/rows/


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``palign audit``'s arguments (the CLI's subparser calls this)."""
    parser.add_argument("config")
    parser.add_argument("--sample", type=int, default=8, metavar="N",
                        help="rows of the truncate input to audit (default 8)")
    parser.add_argument("--target-pass", type=float, default=0.5, metavar="R",
                        help="a prefix 'finishes' when this share of its rollouts pass; the "
                             "suggested threshold best separates those (default 0.5)")
    parser.add_argument("--rollouts", type=int, default=4, metavar="K",
                        help="continuations the student writes per rollout point (default 4)")
    parser.add_argument("--points", type=int, default=3, metavar="P",
                        help="rollout points per row: binary search's prefix, the scan's, "
                             "then 1/4, 1/2 and all of the CoT (default 3)")
    parser.add_argument("--max-probes", type=int, default=64, metavar="G",
                        help="prefix lengths probed per row; longer CoTs get an even grid "
                             "(default 64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path, e.g. data.limit=5")


def main(args: argparse.Namespace) -> int:
    """Run the audit and print where its report is: 0 done, 2 a config, argument or folder
    problem before any work, 1 a failed run, or the signal's exit status when stopped."""
    from palign.config.overrides import parse_set_args

    try:
        cfg = load_config(args.config, parse_set_args(args.set))
        options = Options.of(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        with signals.stop_on_signals():
            return _audit(cfg, options)
    except KeyboardInterrupt as err:
        stop = signals.stop_from(err)
        print(f"stopped by {stop.name}", file=sys.stderr)
        return stop.exit_code


@dataclass(frozen=True)
class Options:
    """The audit's own flags, checked."""

    sample: int
    target_pass: float
    rollouts: int
    points: int
    max_probes: int
    config: str | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Options:
        problems = [f"--{name}: {why}" for name, bad, why in (
            ("sample", args.sample < 1, "at least 1 row"),
            ("target-pass", not 0 < args.target_pass <= 1, "a share in (0, 1]"),
            ("rollouts", args.rollouts < 1, "at least 1 sample per point"),
            ("points", args.points < 1, "at least 1 rollout point"),
            ("max-probes", args.max_probes < 2, "at least 2 (1 and the whole CoT)")) if bad]
        if problems:
            raise ConfigError(format_problems(problems))
        return cls(args.sample, args.target_pass, args.rollouts, args.points, args.max_probes,
                   str(args.config))


def _audit(cfg: Config, opts: Options) -> int:
    start = time.time()
    try:
        cfg = absolute_paths(cfg)
        with signals.shielded(RunLock(cfg.run.output_dir, stale_s=cfg.run.lock_stale_s)):
            result = run_audit(cfg, opts)
    except (StageError, RunLocked, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)  # ConfigError is a ValueError
        return 2
    except (StageFailed, MachineryError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(result.describe(time.time() - start))
    return 0


@dataclass
class AuditResult:
    folder: str
    sampled: int
    audited: int
    rejects: list[str]
    summary: dict[str, Any]
    pools: int

    def describe(self, wall_s: float) -> str:
        s = self.summary
        th, mono, bvs = s["threshold"], s["monotonicity"], s["binary_vs_scan"]
        lines = [f"judge audit: {self.audited} of {self.sampled} sampled rows audited "
                 f"({len(self.rejects)} rejected) in {wall_s:.1f} s, {self.pools} engine "
                 f"pool(s)",
                 f"  monotonicity breaks: {mono['breaks']} in {mono['rows_with_breaks']} rows; "
                 f"binary search differs from a scan in {bvs['differ']} rows",
                 f"  threshold: current {th['current']}, suggested "
                 f"{'none' if th['suggested'] is None else format(th['suggested'], '.3f')} "
                 f"at target pass rate {th['target_pass']}"]
        lines += [f"  rejected: {r}" for r in self.rejects[:5]]
        lines.append(f"report: {storage.join(self.folder, AUDIT_MD)} (JSON and PNGs beside it)")
        return "\n".join(lines)


def run_audit(cfg: Config, opts: Options) -> AuditResult:
    """The audit of ``cfg`` (paths absolute, the run's lock held); see the module docstring."""
    folder = storage.join(cfg.run.output_dir, AUDIT)
    source, cot_only = audit_source(cfg)
    work = sample_plan(source, opts.sample, cfg.run.seed, cot_only)
    if not work.pending:
        raise StageError(f"no row to audit in {source} (the truncate input has no row with a "
                         "CoT)")
    log.info("audit: %d rows sampled from %s", work.pending, source)
    storage.delete_dir(folder)
    one_pool = (cfg.judge_model == cfg.models.student
                and cfg.truncate.engine == cfg.align.engine)
    rows_dir = storage.join(folder, ROWS)
    rejects: list[str] = []
    if one_pool:
        summary = _pool(cfg, opts, "both", work, rows_dir, cfg.judge_model)
    else:
        log.info("audit: the judge (%s) is not the student (%s) on the same engine: curves "
                 "first, then rollouts", cfg.judge_model, cfg.models.student)
        curves_dir = storage.join(folder, CURVES)
        _pool(cfg, opts, "curves", work, curves_dir, cfg.judge_model)
        rejects += reject_reasons(curves_dir)
        rolled = plan(curves_dir, pa.array([], pa.string()))
        summary = _pool(cfg, opts, "rollouts", rolled, rows_dir, cfg.models.student)
    rejects += reject_reasons(rows_dir)
    audited = count_rows(rows_dir)
    if audited + len(rejects) != work.pending:
        raise StageFailed(f"audit: {work.pending} rows sampled, but {audited} audited and "
                          f"{len(rejects)} rejected (in {folder}/)")
    if not audited:
        raise StageFailed(f"audit: every sampled row was rejected, e.g. {rejects[0]} "
                          f"(rejects in {rows_dir}/{REJECTS}/)")
    records = list(read_rows(rows_dir))
    settings = AuditSettings(
        threshold=cfg.truncate.threshold, target_pass=opts.target_pass,
        verdict_mode=cfg.truncate.verdict, rollouts=opts.rollouts, points=opts.points,
        max_probes=opts.max_probes, sample=opts.sample, config=opts.config)
    stored = stored_probes(cfg, {str(r["id"]) for r in records})
    report = write_audit(folder, records, settings, stored, f"judge audit: {cfg.run.name}")
    save_summary(summary)
    return AuditResult(folder, work.pending, audited, rejects, report, 1 if one_pool else 2)


def _pool(cfg: Config, opts: Options, phase: str, work: Plan, out_dir: str,
          model: str) -> StageSummary:
    """One engine pool of the audit stage over ``work``, writing ``out_dir``."""
    engine = cfg.align.engine if phase == "rollouts" else cfg.truncate.engine
    section = AuditSection(
        engine=engine, truncate=cfg.truncate, align=cfg.align, max_probes=opts.max_probes,
        rollouts=opts.rollouts, points=opts.points, phase=phase,
        max_row_attempts=cfg.truncate.max_row_attempts, max_reject_share=1.0)
    token = new_token()
    prepare_output(out_dir, cfg.run.retry_rejects, token)
    spec = WorkerSpec.for_tool(cfg, AUDIT, STAGE_CLASS, section, model, out_dir, token)
    return run_planned(cfg, spec, work)


def audit_source(cfg: Config) -> tuple[str, bool]:
    """Truncate's input and whether only its rows with a CoT count: the output of the stage
    the config lists before truncate, where it has rows; else the ingested data (ingested
    now if needed), whose rows without a CoT generate would have written one for."""
    earlier = stages_before(cfg.run.stages, "truncate")
    if earlier:
        folder = cfg.stage_dir(earlier[-1])
        if storage.is_dir(folder) and count_rows(folder):
            return folder, False
        log.info("audit: %s has no rows yet: auditing the ingested rows that have a CoT",
                 earlier[-1])
    return ingest(cfg), True


def rank(seed: int, text: str) -> str:
    """A row's or shard's place in the sample's order: a hash of the run's seed and its
    name, the same on every machine and every run."""
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def sample_plan(folder: str, n: int, seed: int, cot_only: bool) -> Plan:
    """Read items for ``n`` rows of ``folder`` (those with ``has_cot`` when ``cot_only``):
    whole shards in hash order until they hold ``n`` candidates, then the candidates in hash
    order of their ids. Each chosen shard is read skipping its other rows."""
    index = read_index(folder, ("id", "has_cot") if cot_only else ("id",))
    if not index.num_rows:
        return Plan()
    ok = pc.fill_null(index["has_cot"], False) if cot_only else None
    candidates = index.filter(ok) if ok is not None else index
    counts = dict(zip(*(c.to_pylist() for c in
                        candidates.group_by(FILE).aggregate([("id", "count")])
                        .select([FILE, "id_count"]).columns)))
    shards, held = [], 0
    for shard in sorted(counts, key=lambda s: rank(seed, s)):
        if held >= n:
            break
        shards.append(shard)
        held += counts[shard]
    in_shards = candidates.filter(pc.is_in(candidates[FILE], value_set=pa.array(shards)))
    ids = [str(i) for i in in_shards["id"].to_pylist()]
    chosen = set(sorted(ids, key=lambda i: rank(seed, i))[:n])
    everything = index.filter(pc.is_in(index[FILE], value_set=pa.array(shards)))
    skip: dict[str, list[str]] = {s: [] for s in shards}
    for shard, row_id in zip(everything[FILE].to_pylist(), everything["id"].to_pylist()):
        if str(row_id) not in chosen:
            skip[shard].append(str(row_id))
    items = [{"path": storage.join(folder, s), "skip": skip[s], "extra": {}}
             for s in sorted(shards)]
    return Plan(items=items, rows_in=len(chosen), pending=len(chosen))


def stored_probes(cfg: Config, ids: set[str]) -> dict[str, list[dict[str, Any]]] | None:
    """Truncate's stored probes of ``ids``, by id, reading only the shards that hold them;
    None where truncate has no output."""
    folder = cfg.stage_dir("truncate")
    if not storage.is_dir(folder) or not count_rows(folder):
        return None
    index = read_index(folder)
    mine = index.filter(pc.is_in(index["id"], value_set=pa.array(sorted(ids), pa.string())))
    out: dict[str, list[dict[str, Any]]] = {}
    for shard in sorted(set(mine[FILE].to_pylist())):
        for rec in read_committed(storage.join(folder, shard)):
            if str(rec.get("id")) in ids:
                out[str(rec["id"])] = list(rec.get("probes") or [])
    return out
