"""What a stage's start costs on object storage, with and without the index digest.

A stage folder with N committed shards (16 rows each: ``engine.batch_size``'s default, so a
million rows make 62,500 of them) on an S3-compatible server on 127.0.0.1 (moto, in this
process). The reads the driver makes of such a folder: the next stage's plan (``read_index``
of the ids), a resume's done ids (``done_index``: the output and rejects indexes) and a
summary's count (``count_rows``), each timed and its HTTP requests counted (moto's request log),
first with one index file per shard, then after ``write_digests`` (what the runner writes at a
stage's start and end), then with 5 % more shards written after the digest (a stage resumed
after a kill: those are read one by one).

Seconds here are those of moto, a Python server sharing this machine's cores with the client;
the request counts carry over to a real store, where each is a round trip (tens of ms) and the
driver reads 16 at a time.

    python benchmarks/index_digest.py [--sizes 1000 4000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from host import host_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "index_digest_s3_moto.json"
ROWS_PER_SHARD = 16
BUCKET = "bench-digest"


class RequestCount(logging.Handler):
    """Counts the requests moto's server logs (one record per HTTP request)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if '"' in record.getMessage():  # werkzeug's access line: '... "GET /... HTTP/1.1" 200'
            self.n += 1


def start_server() -> object:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).create_bucket(
        Bucket=BUCKET)
    return server


def write_shards(folder: str, first: int, count: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from palign.data.shards import write_shard

    def one(i: int) -> None:
        rows = [{"id": f"r{i:07d}-{j:02d}", "prefix_ratio": 0.5} for j in range(ROWS_PER_SHARD)]
        write_shard(folder, f"part-{i:07d}", rows, "jsonl",
                    {"prefix_ratio": [0.5] * ROWS_PER_SHARD})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(first, first + count)))


def measure(counter: RequestCount, fn) -> tuple[float, int, object]:
    before = counter.n
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, counter.n - before, value


def reads(counter: RequestCount, folder: str, shards: int) -> dict[str, dict[str, float]]:
    from palign.data.digest import count_rows, read_index
    from palign.data.shards import done_index

    out = {}
    for name, fn, expect in (
            ("plan (read_index ids)", lambda: read_index(folder).num_rows, shards),
            ("resume (done_index)", lambda: len(done_index(folder)), shards),
            ("summary (count_rows)", lambda: count_rows(folder), shards)):
        seconds, requests, value = measure(counter, fn)
        assert value == expect * ROWS_PER_SHARD, (name, value)
        out[name] = {"seconds": round(seconds, 2), "requests": requests}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000],
                    help="committed shards in the folder")
    args = ap.parse_args()
    counter = RequestCount()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").propagate = False
    server = start_server()
    from palign.data.digest import write_digests

    results = []
    try:
        for n in args.sizes:
            folder = f"s3://{BUCKET}/n{n}/truncate"
            write_shards(folder, 0, n)
            row = {"shards": n, "rows": n * ROWS_PER_SHARD,
                   "without_digest": reads(counter, folder, n)}
            seconds, requests, _ = measure(counter, lambda folder=folder: write_digests(folder))
            row["write_digests"] = {"seconds": round(seconds, 2), "requests": requests}
            row["with_digest"] = reads(counter, folder, n)
            extra = max(1, n // 20)
            write_shards(folder, n, extra)
            row["digest_plus_5pct_new"] = reads(counter, folder, n + extra)
            results.append(row)
            print(f"{n} shards done", flush=True)
    finally:
        server.stop()

    print(f"\n{'shards':>7} {'read':<22} {'no digest s/req':>16} {'digest s/req':>14} "
          f"{'digest+5% s/req':>16}")
    for row in results:
        for name in row["without_digest"]:
            cells = [row[k][name] for k in ("without_digest", "with_digest",
                                            "digest_plus_5pct_new")]
            print(f"{row['shards']:>7} {name:<22} "
                  + " ".join(f"{c['seconds']:>8.2f}/{c['requests']:<6}" for c in cells))
        w = row["write_digests"]
        print(f"{row['shards']:>7} {'write_digests':<22} {w['seconds']:>8.2f}/{w['requests']:<6}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "benchmark": "index_digest",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host_info(),
        "store": "moto ThreadedMotoServer on 127.0.0.1, in the benchmark's process",
        "rows_per_shard": ROWS_PER_SHARD,
        "results": results,
    }, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
