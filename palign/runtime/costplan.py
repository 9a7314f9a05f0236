"""``palign plan``: what the whole input will cost, measured on a few rows before the GPUs start.

The driver runs the config's engine stages (or ``--stages``) on the first N source rows, in a
scratch folder ``<output_dir>/_plan/`` (cleared each time) with the real runner, one replica per
stage; or, with ``--from RUN``, runs nothing and reads a finished run. Either way each stage's
``_SUMMARY.json`` (``palign.report.summary_file``) and index columns give its wall time, engine
start and tokens per row, which ``palign.report.plan`` projects to the whole input on the
config's cluster. The first N rows are read straight from the source: ``data.limit`` would
still ingest (validate and shard) every file before the stages see a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from palign.common.failures import MachineryError, StageFailed
from palign.config import Config, ConfigError, format_problems, load_config
from palign.config.overrides import parse_set_args
from palign.data import lines, storage
from palign.data.digest import count_rows, read_index
from palign.data.ingest import iter_source, source_files
from palign.data.layout import DONE_MARKER
from palign.data.shards import reject_reasons
from palign.report.plan import (
    DEFAULT_TRAIN_TOKENS_PER_GPU_S,
    TRAIN_RATE_SOURCE,
    Figure,
    StageMeasure,
    Target,
    TrainSetup,
    build_plan,
    format_plan,
    measure_from_summary,
)
from palign.report.summary_file import read_summary
from palign.runtime.resources import ResourceError, engine_request
from palign.stages import registry

log = logging.getLogger(__name__)

SCRATCH = "_plan"
SAMPLE_FILE = "_sample.jsonl"
COUNT_LINES_MAX_BYTES = 2 << 30  # a JSONL source up to this size has its lines counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``palign plan``'s arguments (the CLI's subparser calls this)."""
    parser.add_argument("config")
    parser.add_argument("--sample", type=int, default=8, metavar="N",
                        help="rows to measure each engine stage on (default 8)")
    parser.add_argument("--from", dest="from_run", metavar="RUN",
                        help="read a finished run's output folder instead of running a sample")
    parser.add_argument("--stages", metavar="A,B",
                        help="the stages to measure (default: the config's engine stages)")
    parser.add_argument("--rows", type=int, metavar="N",
                        help="the whole input's source rows, when you know them (default: "
                             "counted, or estimated from the source's size)")
    parser.add_argument("--train-tokens-per-gpu-s", type=float, metavar="R",
                        help=f"train's assumed tokens/s per worker (default with GPUs: "
                             f"{DEFAULT_TRAIN_TOKENS_PER_GPU_S:,.0f}, {TRAIN_RATE_SOURCE})")
    parser.add_argument("--json", dest="json_out", metavar="FILE",
                        help="also write the plan as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path, e.g. data.limit=5")


def main(args: argparse.Namespace) -> int:
    """Measure (or read), project, print the plan; 2 for a config or argument error, 1 when
    the sample run fails."""
    try:
        sets = parse_set_args(args.set)
        cfg = load_config(args.config, sets)
        stages = plan_stages(cfg, args.stages)
        targets = {s: _target(cfg, s) for s in stages}
        if args.sample < 1 and not args.from_run:
            raise ConfigError(format_problems(["--sample: at least 1 row"]))
    except (ConfigError, ResourceError) as err:
        print(err, file=sys.stderr)
        return 2
    notes: list[str] = []
    try:
        if args.from_run:
            measures, measured_rows, bytes_per_row = read_run(args.from_run, stages, targets,
                                                              notes)
        else:
            measures, measured_rows, bytes_per_row = sample_run(
                args.config, sets, cfg, stages, targets, args.sample, notes)
    except (StageFailed, MachineryError, FileNotFoundError, ValueError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    rows_total = input_rows(cfg, args.rows, bytes_per_row)
    train, rate = train_setup(cfg, args.train_tokens_per_gpu_s, notes)
    plan = build_plan(measures, targets, rows_total, measured_rows, train, rate, notes)
    print(format_plan(plan))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
            f.write("\n")
    return 0


def plan_stages(cfg: Config, given: str | None) -> list[str]:
    """The stages to measure: ``given`` (comma-separated, each a row stage with an engine in
    this config), else every listed row stage that runs an engine."""
    if not given:
        return [s for s in cfg.run.stages
                if registry.get(s).driver == "rows" and registry.get(s).needs_engine(cfg)]
    names = [s.strip() for s in given.split(",") if s.strip()]
    problems = []
    for s in names:
        if s not in registry.REGISTRY:
            problems.append(f"--stages: no stage {s!r}")
        elif registry.get(s).driver != "rows" or not registry.get(s).needs_engine(cfg):
            problems.append(f"--stages: {s} runs no engine on the rows here: nothing to measure")
    if problems or not names:
        raise ConfigError(format_problems(problems or ["--stages: name at least one stage"]))
    return names


def _target(cfg: Config, stage: str) -> Target:
    request = engine_request(stage, getattr(cfg, stage).engine)
    return Target(request.max_replicas, request.gpus_per_replica)


# ------------------------------------------------------------------------------- measuring


def sample_run(config_path: str, sets: dict[str, Any], cfg: Config, stages: list[str],
               targets: dict[str, Target], n: int, notes: list[str]
               ) -> tuple[list[StageMeasure], int, float]:
    """Run ``stages`` on the source's first ``n`` rows in ``<output_dir>/_plan/``; their
    measures, the rows read and their JSON bytes per row."""
    from palign.data.runlock import RunLock
    from palign.runtime.runner import ingest, init_ray, run_stage
    from palign.runtime.summary import save_summary

    scratch = storage.join(storage.absolute(cfg.run.output_dir), SCRATCH)
    storage.delete_dir(scratch)
    sample = storage.join(scratch, SAMPLE_FILE)
    rows, size = write_sample(cfg, sample, n)
    if not rows:
        raise ValueError(f"data.path: {cfg.data.path} holds no row to sample")
    init_ray(cfg)  # before any stage: Ray's start is no stage's time
    device, gpus, cpus = cluster_device()
    overrides = {**sets, "run.output_dir": scratch, "run.stages": stages, "data.path": sample,
                 "data.format": "jsonl", "data.limit": None, "data.split": None,
                 "data.max_reject_share": 1.0}
    for s in stages:
        overrides.update(_sample_engine(cfg, s, gpus, cpus, notes))
    scfg = load_config(config_path, overrides)
    ingest(scfg)  # its time is no stage's either
    with RunLock(scfg.run.output_dir, stale_s=scfg.run.lock_stale_s):
        for s in stages:
            save_summary(run_stage(scfg, s))
    notes.append(f"measured on {rows} source rows, one replica per stage, on {device}, in "
                 f"{scratch}/")
    measures = [_measure(scratch, s, 1, device) for s in stages]
    return [m for m in measures if m is not None], rows, size / rows


def _sample_engine(cfg: Config, stage: str, gpus: float, cpus: float,
                   notes: list[str]) -> dict[str, Any]:
    """A stage's engine for the sample: one replica, fitted to this cluster (a GPU engine on
    CPU when there is no GPU, fewer CPUs when a replica asks more than the cluster has)."""
    engine = getattr(cfg, stage).engine
    out: dict[str, Any] = {f"{stage}.engine.replicas": {"min": 1, "max": 1},
                           f"{stage}.max_reject_share": 1.0}
    if engine.gpus_per_replica > gpus:
        fit = 1 if gpus >= 1 else 0
        out[f"{stage}.engine.gpus_per_replica"] = fit
        out[f"{stage}.engine.tensor_parallel_size"] = 1
        notes.append(f"{stage}: the sample ran on {fit} GPU(s) per replica, the config asks "
                     f"{engine.gpus_per_replica:g} (this cluster has {gpus:g})")
    if engine.cpus_per_replica > cpus:
        out[f"{stage}.engine.cpus_per_replica"] = max(1, int(cpus))
        notes.append(f"{stage}: the sample ran on {max(1, int(cpus))} CPUs per replica, the "
                     f"config asks {engine.cpus_per_replica:g}")
    return out


def write_sample(cfg: Config, path: str, n: int) -> tuple[int, int]:
    """The source's first ``n`` rows (any format) as JSONL at ``path``; rows and bytes."""
    out: list[str] = []
    for _, raw in iter_source(cfg.data):
        if isinstance(raw, lines.Unreadable):
            continue  # ingest would reject it: no stage's work
        out.append(json.dumps(raw, ensure_ascii=False, default=str))
        if len(out) >= n:
            break
    text = "".join(line + "\n" for line in out)
    storage.write_text(path, text)
    return len(out), len(text.encode("utf-8"))


def cluster_device() -> tuple[str, float, float]:
    """(what the cluster runs on, in words; its GPUs; its CPUs) from Ray's resources."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", os.cpu_count() or 1))
    kinds = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    if gpus:
        return f"gpu: {gpus:g} x {'/'.join(kinds) or 'GPU'}", gpus, cpus
    return f"cpu ({cpus:g} cores, no GPU)", gpus, cpus


def read_run(run: str, stages: list[str], targets: dict[str, Target], notes: list[str]
             ) -> tuple[list[StageMeasure], int, float]:
    """The measures a finished run left (``_SUMMARY.json`` per stage); nothing runs."""
    run = storage.absolute(run)
    if not storage.is_dir(run):
        raise FileNotFoundError(f"--from: {run} is not a folder")
    measures = []
    for s in stages:
        m = _measure(run, s, targets[s].replicas, "not recorded")
        if m is None or not m.rows:
            notes.append(f"{s}: {run}/{s}/ holds no summary of rows processed: not projected")
            continue
        measures.append(m)
    if not measures:
        raise FileNotFoundError(f"--from: no stage summary with rows processed under {run}/")
    notes.append(f"--from {run}: each stage assumed to have run with the config's "
                 "replicas (max) on the config's devices (a summary records neither)")
    ingested = storage.join(run, "ingest")
    if storage.exists(storage.join(ingested, DONE_MARKER)):
        rows = count_rows(ingested) + len(reject_reasons(ingested))
    else:
        first = read_summary(storage.join(run, measures[0].stage)) or {}
        rows = int(first.get("rows_in") or measures[0].rows)
    return measures, rows, 0.0


def _measure(run: str, stage: str, replicas: int, device: str) -> StageMeasure | None:
    """One stage's measure from its summary, with its index columns' means per row."""
    from dataclasses import replace

    folder = storage.join(run, stage)
    summary = read_summary(folder)
    if summary is None:
        return None
    m = measure_from_summary(summary, replicas, device)
    columns = [c for c in registry.get(stage).index_columns
               if c.endswith("_tokens") or c == "probes"]
    if columns and m.rows_out:
        import pyarrow as pa
        import pyarrow.compute as pc

        index = read_index(folder, columns)
        numeric = [c for c in columns  # a column no shard holds comes back as text nulls
                   if pa.types.is_integer(index[c].type) or pa.types.is_floating(index[c].type)]
        means = {c: pc.mean(index[c]).as_py() for c in numeric}
        m = replace(m, per_row={c: float(v) for c, v in means.items() if v is not None})
    return m


# ------------------------------------------------------------------------------ the input


def input_rows(cfg: Config, given: int | None, bytes_per_row: float) -> Figure:
    """The whole input's source rows: given, counted (a finished ingest, Parquet metadata, the
    lines of a JSONL source up to 2 GiB) or estimated from its bytes per sampled row."""
    figure = _input_rows(cfg, given, bytes_per_row)
    limit = cfg.data.limit
    if limit is not None and figure.value is not None and figure.value > limit:
        return Figure(float(limit), figure.tag, f"data.limit ({figure.note}: "
                                                f"{figure.value:,.0f})")
    return figure


def _input_rows(cfg: Config, given: int | None, bytes_per_row: float) -> Figure:
    if given is not None:
        return Figure(float(given), "assumed", "given with --rows")
    ingested = storage.join(storage.absolute(cfg.run.output_dir), "ingest")
    if storage.exists(storage.join(ingested, DONE_MARKER)):
        return Figure(float(count_rows(ingested) + len(reject_reasons(ingested))), "measured",
                      "counted in the run's ingest, rejects included")
    files = source_files(cfg.data)
    if all(f.kind == "parquet" for f in files):
        import pyarrow.parquet as pq

        total = 0
        for f in files:
            fs, path = storage.resolve(f.path)
            with fs.open_input_file(path) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return Figure(float(total), "measured", "counted from the Parquet metadata")
    size = sum(storage.file_size(f.path) for f in files)
    plain = all(f.kind == "jsonl" and not f.path.endswith(lines.COMPRESSED) for f in files)
    if plain and size <= COUNT_LINES_MAX_BYTES:
        total = sum(1 for f in files for line in lines.iter_lines(f.path) if line.strip())
        return Figure(float(total), "measured", "the source's non-blank lines, counted")
    if not bytes_per_row:
        return Figure(None, "projected", "not counted: pass --rows")
    return Figure(size / bytes_per_row, "projected",
                  f"estimated: {size:,} bytes / {bytes_per_row:,.0f} bytes per sampled row")


def train_setup(cfg: Config, rate: float | None, notes: list[str]
                ) -> tuple[TrainSetup | None, float | None]:
    """The config's train stage as the plan sees it, and the tokens/s per worker assumed."""
    if "train" not in cfg.run.stages:
        return None, None
    t = cfg.train
    step = t.micro_batch_size * t.grad_accum * t.num_workers * t.seq_len
    setup = TrainSetup(t.num_workers, t.use_gpu, t.epochs, t.max_steps, step)
    if rate is None and t.use_gpu:
        rate = DEFAULT_TRAIN_TOKENS_PER_GPU_S
        notes.append(f"train: {rate:,.0f} tokens/s per GPU assumed: {TRAIN_RATE_SOURCE}; "
                     "pass --train-tokens-per-gpu-s for your student and GPUs")
    elif rate is not None:
        notes.append(f"train: {rate:,.0f} tokens/s per worker assumed (--train-tokens-per-gpu-s)")
    return setup, rate
