"""The data plane at scale, without a model: synthetic rows with 20 KB CoTs through ingest and
truncate (``strategy: full``: every row through the actor pool and written, no engine), then the
same run again with everything done (resume start-up).

Each size runs in a fresh driver process on a fresh local Ray, so that the driver's peak RSS
(``VmHWM``: the process's own high-water mark, not Ray's worker processes) belongs to that size
alone. Prints a table and writes JSON naming the machine.

    python benchmarks/data_plane.py [--sizes 10000 50000 200000] [--keep]

Goals (issue 10): driver peak RSS flat in the row count (200k within 1.2x of 10k, under
1 GiB); rows/s at 200k no worse than at 10k; resume start-up at 200k under 30 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import host_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "data_plane_cpu.json"
COT = " ".join(f"Step {i}: {i} plus {i} is {2 * i}." for i in range(800))  # about 20 KB


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(rows: int, work: Path) -> dict:
    """One size, in this process: write the source, run ingest + truncate, then resume."""
    sys.path.insert(0, str(ROOT))
    from palign.config import parse_config
    from palign.stages.runner import run_stage

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
    cfg = parse_config({
        "run": {"output_dir": str(work / "out"), "stages": ["truncate"]},
        "ray": {"progress_bars": False}, "data": {"path": str(files)},
        "models": {"student": "smollm2-135m"}, "truncate": {"strategy": "full"},
        "engine": {"batch_size": 256, "cpus_per_replica": 1, "replicas": {"min": 2, "max": 2}},
        "output": {"shard_rows": 1024}})
    from palign.stages.runner import init_ray

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
    return {"rows": rows, "source_mib": source_bytes / 2**20, "ray_start_s": t_ray,
            "ingest_truncate_s": wall, "rows_per_s": rows / wall, "resume_s": resume,
            "driver_peak_rss_mib": peak_rss_mib(), "train_rank_data_mib": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        logging.basicConfig(level=logging.WARNING)
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
                  f"{r['driver_peak_rss_mib']:.0f} MiB, resume {r['resume_s']:.1f} s", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'rows':>8} {'source MiB':>11} {'rows/s':>8} {'driver peak MiB':>16} "
          f"{'resume s':>9}")
    for r in results:
        print(f"{r['rows']:>8} {r['source_mib']:>11.0f} {r['rows_per_s']:>8.0f} "
              f"{r['driver_peak_rss_mib']:>16.0f} {r['resume_s']:>9.1f}")
    first, last = results[0], results[-1]
    summary = {
        "driver_rss_ratio_last_to_first": last["driver_peak_rss_mib"]
        / first["driver_peak_rss_mib"],
        "rows_per_s_ratio_last_to_first": last["rows_per_s"] / first["rows_per_s"],
        "resume_s_last": last["resume_s"],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "benchmark": "data_plane", "machine": host_info(),
        "load": "ingest + truncate strategy full (no model), 20 KB CoTs, 8 source files, "
                "local disk, local Ray on this machine's cores (2 truncate actors of 1 CPU, "
                "batch 256); each size in a fresh driver. truncate's own work bounds rows/s: "
                "sentence segmentation takes about 16 ms per 20 KB CoT in pure Python",
        "results": results, "summary": summary,
        "not_measured": "train_rank_data_mib: the train data path (token shards, per-rank "
                        "slices) is not built yet",
    }, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
