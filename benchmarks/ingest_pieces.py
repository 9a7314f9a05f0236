"""Ingest of one large source file: read whole by one task against cut into pieces of
``data.piece_mib`` (a task each), as JSONL and as Parquet. Synthetic rows with 20 KB CoTs (about
1 GB at the default size) on local disk, local Ray on this machine's cores; each setting runs in
a fresh driver process (``ingest_once``, timed without Ray's start). Prints a table and writes
JSON naming the machine.

    python benchmarks/ingest_pieces.py [--rows 45000] [--pieces 0 256 64]

``--pieces 0`` is one task for the whole file (a piece size over the file's). Goal: a file
larger than a piece is read by as many tasks as the cluster has cores, so ingest time falls with
the cores instead of being one task's; the driver's memory does not grow with the pieces.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from host import host_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ingest_pieces_cpu.json"
COT_CHARS = 20_000


def cot_pool() -> str:
    """4 MB of arithmetic steps with random numbers; each row's CoT is a 20 KB slice of it at
    its own offset, so that rows differ and Parquet cannot compress them away."""
    import random

    rng = random.Random(0)
    steps = []
    for k in range(120_000):
        a, b = rng.randrange(10**6), rng.randrange(10**6)
        steps.append(f"Step {k}: {a} plus {b} is {a + b}.")
    return " ".join(steps)


def write_sources(work: Path, rows: int) -> dict[str, Path]:
    """The same rows as one JSONL file and one Parquet file (row groups of 512 rows)."""
    jsonl = work / "big.jsonl"
    pool = cot_pool()
    span = len(pool) - COT_CHARS
    writer = None
    with jsonl.open("w") as f:
        for start in range(0, rows, 512):
            chunk = [{"id": f"r{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i),
                      "cot": pool[(i * 7919) % span:][:COT_CHARS]}
                     for i in range(start, min(rows, start + 512))]
            f.writelines(json.dumps(r) + "\n" for r in chunk)
            table = pa.Table.from_pylist(chunk)
            if writer is None:
                writer = pq.ParquetWriter(work / "big.parquet", table.schema)
            writer.write_table(table)
    assert writer is not None
    writer.close()
    return {"jsonl": jsonl, "parquet": work / "big.parquet"}


def one(source: Path, piece_mib: int, work: Path) -> dict:
    """One ingest, in this process."""
    sys.path.insert(0, str(ROOT))
    from palign.config import parse_config
    from palign.data.ingest import source_pieces
    from palign.data.procmem import peak_rss_mib
    from palign.data.shards import count_rows
    from palign.runtime.runner import ingest_once, init_ray

    size_mib = source.stat().st_size / 2**20
    piece = piece_mib or int(size_mib) + 1  # 0: the whole file is one piece
    cfg = parse_config({
        "run": {"output_dir": str(work / "out")}, "ray": {"progress_bars": False},
        "data": {"path": str(source), "piece_mib": piece},
        "models": {"student": "smollm2-135m"}, "output": {"shard_rows": 1024}})
    t0 = time.time()
    init_ray(cfg)
    t_ray = time.time() - t0
    t0 = time.time()
    ingest_once(cfg, str(work / "out" / "ingest"), cfg.data)
    wall = time.time() - t0
    rows = count_rows(str(work / "out" / "ingest"))
    return {"format": source.suffix[1:], "piece_mib": piece_mib or None,
            "pieces": len(source_pieces(cfg.data, piece << 20)), "source_mib": size_mib,
            "rows": rows, "ray_start_s": t_ray, "ingest_s": wall, "rows_per_s": rows / wall,
            "mib_per_s": size_mib / wall, "driver_peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=45_000)
    ap.add_argument("--pieces", type=int, nargs="+", default=[0, 256, 64],
                    help="piece sizes in MiB; 0: the whole file in one task")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--piece", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        from palign.common.logs import setup_driver_logging

        setup_driver_logging(logging.WARNING)
        print("RESULT " + json.dumps(one(args.one, args.piece, args.work)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="palign-ingest-pieces-"))
    sources = write_sources(work, args.rows)
    results = []
    try:
        for fmt, source in sources.items():
            for piece in args.pieces:
                out = work / f"{fmt}-{piece}"
                run = subprocess.run([sys.executable, __file__, "--one", str(source), "--piece",
                                      str(piece), "--work", str(out)],
                                     capture_output=True, text=True, check=False)
                line = next((ln for ln in run.stdout.splitlines()
                             if ln.startswith("RESULT ")), None)
                if run.returncode or line is None:
                    sys.exit(f"{fmt} piece {piece} failed:\n{run.stdout[-3000:]}\n"
                             f"{run.stderr[-3000:]}")
                r = json.loads(line[len("RESULT "):])
                results.append(r)
                print(f"{fmt:>8} piece {piece or 'whole':>6}: {r['pieces']} task(s), "
                      f"{r['ingest_s']:.1f} s, {r['rows_per_s']:.0f} rows/s", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)
    machine = host_info()
    print(f"\n{'format':>8} {'piece MiB':>10} {'tasks':>6} {'source MiB':>11} {'ingest s':>9} "
          f"{'rows/s':>8} {'MiB/s':>7} {'driver peak MiB':>16}")
    for r in results:
        print(f"{r['format']:>8} {str(r['piece_mib'] or 'whole'):>10} {r['pieces']:>6} "
              f"{r['source_mib']:>11.0f} {r['ingest_s']:>9.1f} {r['rows_per_s']:>8.0f} "
              f"{r['mib_per_s']:>7.1f} {r['driver_peak_rss_mib']:>16.0f}")
    print(f"machine: {machine}")
    OUT.write_text(json.dumps({
        "benchmark": "ingest_pieces", "machine": machine,
        "load": f"one source file of {args.rows} rows with 20 KB CoTs, as JSONL and as Parquet "
                "(row groups of 512 rows; CoTs are 20 KB slices of random arithmetic text), "
                "local disk; ingest_once (validate, write shards of "
                "1024 rows, settle limits and repeats) on a local Ray of this machine's cores, "
                "each setting in a fresh driver, timed without Ray's start",
        "results": results}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
