"""The data plane at scale, without a model: synthetic rows with 20 KB CoTs through ingest and
truncate (``strategy: full``: every row through the actor pool and written, no engine), then the
same run again with everything done (resume start-up); and the train data path: synthetic align
rows (2 KB targets) tokenised with SmolLM2's tokenizer and packed into 4096-token units by Ray
Data tasks (``palign.train.prepare``), then one rank of a 2-worker run reading every unit of
its steps for an epoch, in its own process (per-rank data memory).

Each size runs in a fresh driver process on a fresh local Ray, so that the driver's peak RSS
(``VmHWM``: the process's own high-water mark, not Ray's worker processes) belongs to that size
alone. Prints a table and writes JSON naming the machine.

    python benchmarks/data_plane.py [--sizes 10000 50000 200000] [--keep]

Goals (issue 10): driver peak RSS flat in the row count (200k within 1.2x of 10k, under
1 GiB); rows/s at 200k no worse than at 10k; resume start-up at 200k under 30 s; train per-rank
data memory flat in the corpus size.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from host import host_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "data_plane_cpu.json"
COT = " ".join(f"Step {i}: {i} plus {i} is {2 * i}." for i in range(800))  # about 20 KB
TARGET = COT[:2048]  # the train rows' targets: about 1.3k tokens with the chat, 3 a unit
SEQ_LEN = 4096


def write_align(folder: Path, rows: int) -> None:
    """Synthetic align-stage shards (id, question, target), 1024 rows each, a chunk at a time."""
    from palign.data.shards import write_shard
    from palign.method.targets import training_target

    for start in range(0, rows, 1024):
        chunk = [{"id": f"r{i}", "question": f"What is {i} + {i}?",
                  "target": training_target(TARGET, f"So \\boxed{{{2 * i}}}.")}
                 for i in range(start, min(rows, start + 1024))]
        write_shard(folder, f"part-{start:09d}", chunk)


def rank_probe(folder: str) -> dict:
    """Rank 0 of 2 (micro-batch 1): every micro-batch of one epoch read and collated; the
    process's peak RSS over its RSS before the data path was opened."""
    sys.path.insert(0, str(ROOT))
    from palign.data.procmem import peak_rss_mib, rss_mib
    from palign.train.batches import collate  # the loop's imports, before the baseline
    from palign.train.steps import StepPlan
    from palign.train.units import UnitReader

    # Arrow's first Parquet read sets up its allocator and threads (about 46 MiB here, the same
    # for any file): done on a tiny table first, so the figure is the data path's own.
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), sink)
    pq.read_table(io.BytesIO(sink.getvalue()))
    base = rss_mib()
    t0 = time.time()
    reader = UnitReader(folder)
    plan = StepPlan(len(reader), 2, 1, 1, 1, None, 0)
    units = 0
    nbytes = 0
    for step in range(plan.total_steps):
        for idx in plan.micro_batches(step, 0):
            batch = collate([reader.unit(i) for i in idx], reader.prepared.pad_id).batch
            units += len(idx)
            nbytes += sum(reader._row(i)[2] * 4 for i in idx)  # (window, offset, size)
            del batch
    return {"rank_units_read": units, "rank_bytes_read_mib": nbytes / 2**20,
            "units_total": len(reader),
            "unit_bytes_total_mib": reader.prepared.unit_bytes / 2**20,
            "rank_read_s": time.time() - t0,
            "train_rank_data_mib": peak_rss_mib() - base}


def one(rows: int, work: Path) -> dict:
    """One size, in this process: write the source, run ingest + truncate, then resume."""
    sys.path.insert(0, str(ROOT))
    from palign.config import parse_config
    from palign.data.procmem import peak_rss_mib
    from palign.runtime.runner import run_stage

    data = work / "data.jsonl"
    with data.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "question": f"What is {i} + {i}?",
                                "answer": str(2 * i), "cot": COT}) + "\n")
    # Several source files, as a large dataset comes: ingest reads them in parallel.
    files = work / "source"
    files.mkdir()
    per = max(1, rows // 8)
    with data.open() as f:
        for k, start in enumerate(range(0, rows, per)):
            with (files / f"part-{k:03d}.jsonl").open("w") as out:
                for _ in range(min(per, rows - start)):
                    out.write(f.readline())
    data.unlink()
    source_bytes = sum(p.stat().st_size for p in files.iterdir())
    write_align(work / "out" / "align", rows)
    cfg = parse_config({
        "run": {"output_dir": str(work / "out"), "stages": ["truncate"]},
        "ray": {"progress_bars": False}, "data": {"path": str(files)},
        "models": {"student": "smollm2-135m"}, "truncate": {"strategy": "full"},
        "engine": {"batch_size": 256, "cpus_per_replica": 1, "replicas": {"min": 2, "max": 2}},
        "output": {"shard_rows": 1024}, "train": {"seq_len": SEQ_LEN}})
    from palign.data.procmem import lean_driver_memory
    from palign.runtime.runner import init_ray

    lean_driver_memory()  # as `palign run` does in its driver
    t0 = time.time()
    init_ray(cfg)
    t_ray = time.time() - t0
    t0 = time.time()
    first = run_stage(cfg, "truncate")
    wall = time.time() - t0
    t0 = time.time()
    again = run_stage(cfg, "truncate")
    resume = time.time() - t0
    assert first.rows_out == rows and again.skipped == rows and again.processed == 0
    driver_peak = peak_rss_mib()  # the stages' driver, before the train data path
    arrow_peak = pa.default_memory_pool().max_memory() / 2**20  # Arrow's share of it
    from palign.train.prepare import prepare

    t0 = time.time()
    prepared = prepare(cfg)
    prep = time.time() - t0
    t0 = time.time()
    assert prepare(cfg) == prepared
    prep_resume = time.time() - t0
    assert prepared.rows_used == rows
    probe = subprocess.run([sys.executable, __file__, "--rank-probe", prepared.folder],
                           capture_output=True, text=True, check=True)
    line = next(ln for ln in probe.stdout.splitlines() if ln.startswith("RESULT "))
    return {"rows": rows, "source_mib": source_bytes / 2**20, "ray_start_s": t_ray,
            "ingest_truncate_s": wall, "rows_per_s": rows / wall, "resume_s": resume,
            "train_prep_s": prep, "train_prep_rows_per_s": rows / prep,
            "train_prep_resume_s": prep_resume, "train_units": prepared.n_units,
            "packing_efficiency": prepared.packing_efficiency,
            "driver_peak_rss_mib": driver_peak, "driver_arrow_pool_peak_mib": arrow_peak,
            "driver_peak_rss_with_prep_mib": peak_rss_mib(),
            **json.loads(line[len("RESULT "):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rank-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_probe:
        print("RESULT " + json.dumps(rank_probe(args.rank_probe)), flush=True)
        return
    if args.one:
        from palign.common.logs import setup_driver_logging

        setup_driver_logging(logging.WARNING)
        print("RESULT " + json.dumps(one(args.one, args.work)), flush=True)
        return
    results = []
    for rows in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"palign-dataplane-{rows}-"))
        try:
            run = subprocess.run([sys.executable, __file__, "--one", str(rows), "--work",
                                  str(work)], capture_output=True, text=True, check=False)
            line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if run.returncode or line is None:
                sys.exit(f"{rows} rows failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{rows:>8} rows: {r['rows_per_s']:.0f} rows/s, driver peak "
                  f"{r['driver_peak_rss_mib']:.0f} MiB, resume {r['resume_s']:.1f} s, train "
                  f"prep {r['train_prep_rows_per_s']:.0f} rows/s, rank data "
                  f"{r['train_rank_data_mib']:.1f} MiB", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'rows':>8} {'source MiB':>11} {'rows/s':>8} {'driver peak MiB':>16} "
          f"{'resume s':>9} {'prep rows/s':>12} {'prep resume s':>14} {'units':>7} "
          f"{'rank read MiB':>14} {'rank data MiB':>14}")
    for r in results:
        print(f"{r['rows']:>8} {r['source_mib']:>11.0f} {r['rows_per_s']:>8.0f} "
              f"{r['driver_peak_rss_mib']:>16.0f} {r['resume_s']:>9.1f} "
              f"{r['train_prep_rows_per_s']:>12.0f} {r['train_prep_resume_s']:>14.1f} "
              f"{r['train_units']:>7} {r['rank_bytes_read_mib']:>14.0f} "
              f"{r['train_rank_data_mib']:>14.1f}")
    first, last = results[0], results[-1]
    summary = {
        "driver_rss_ratio_last_to_first": last["driver_peak_rss_mib"]
        / first["driver_peak_rss_mib"],
        "rows_per_s_ratio_last_to_first": last["rows_per_s"] / first["rows_per_s"],
        "resume_s_last": last["resume_s"],
        "train_rank_data_mib_last_minus_first": last["train_rank_data_mib"]
        - first["train_rank_data_mib"],
        "train_rank_data_mib_last": last["train_rank_data_mib"],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "benchmark": "data_plane", "machine": host_info(),
        "load": "ingest + truncate strategy full (no model), 20 KB CoTs, 8 source files, "
                "local disk, local Ray on this machine's cores (2 truncate actors of 1 CPU, "
                "batch 256); each size in a fresh driver. truncate's own work bounds rows/s: "
                "sentence segmentation takes about 16 ms per 20 KB CoT in pure Python. Train data: "
                "synthetic align rows with 2 KB targets, SmolLM2's tokenizer, seq_len 4096, "
                "windows of 1024 rows, Ray Data tasks of 1 CPU; the rank is rank 0 of 2 "
                "(micro-batch 1), reading and collating every unit of one epoch in its own "
                "process; train_rank_data_mib is that process's peak RSS over its RSS after "
                "importing the loop's modules (torch, transformers) and a first tiny Parquet read "
                "(Arrow's allocator set-up, about 46 MiB on any file). driver_peak_rss_mib is "
                "the driver's peak before the train data preparation (which imports torch, "
                "about 150 MiB, as any run with a train stage does: driver_peak_rss_with_prep_"
                "mib)",
        "results": results, "summary": summary,
        "goals": {"driver_rss_ratio_200k_to_10k_max": 1.2, "driver_peak_rss_mib_max": 1024,
                  "rows_per_s_ratio_min": 1.0, "resume_s_200k_max": 30,
                  "train_rank_data_mib": "flat in the corpus size"},
    }, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
