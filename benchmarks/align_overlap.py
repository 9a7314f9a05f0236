"""Generation with a long tail of output lengths: one batch at a time against overlapping batches.

The align stage (and generate, evaluate) hands the engine one Ray Data batch per call. Served
one batch at a time, each batch waits for its longest output while the engine runs that one
row alone. palign's actors hold several batches at once on one engine server
(``palign.engines.server``), so the other batches' rows fill the engine meanwhile.

Rows: most ask for a one-number answer (a few tokens), one in every ``--long-every`` asks for
a long story and runs to ``--max-tokens``. Both modes serve the same rows in the same batches
through the same server and vLLM engine (SmolLM2-135M, fp32, greedy), built before the clock:

- ``one batch at a time``: batches in order, each call waiting for the previous one;
- ``overlapping``: ``--batches-in-flight`` threads take batches from a queue, as a stage
  actor's concurrent calls do.

Prints a table and writes JSON (machine, rows/s and output tokens/s per mode, ``speedup``).

    python benchmarks/align_overlap.py [--rows 64] [--batch-size 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import threading
import time
from pathlib import Path

from host import host_info

from palign.common.logs import setup_driver_logging
from palign.config import EngineConfig
from palign.engines import EngineSpec, Sampling, build_engine
from palign.engines.models import resolve_model
from palign.engines.server import EngineServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def chats(n: int, long_every: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        if i % long_every == long_every // 2:
            text = (f"Write a very long and detailed story, at least two thousand words, about "
                    f"a lighthouse keeper number {i} and the ships she watched over the years.")
        else:
            text = f"What is {i} + {2 * i + 3}? Reply with the number only."
        out.append([{"role": "user", "content": text}])
    return out


def one_at_a_time(server: EngineServer, batches: list, sampling: Sampling) -> list:
    return [server.generate(b, sampling) for b in batches]


def overlapping(server: EngineServer, batches: list, sampling: Sampling, threads: int) -> list:
    todo: queue.Queue = queue.Queue()
    for i, b in enumerate(batches):
        todo.put((i, b))
    done: dict[int, list] = {}

    def worker() -> None:
        while True:
            try:
                i, b = todo.get_nowait()
            except queue.Empty:
                return
            done[i] = server.generate(b, sampling)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return [done[i] for i in range(len(batches))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--long-every", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batches-in-flight", type=int, default=4)
    ap.add_argument("--load", default="nothing else running")
    ap.add_argument("--out", default=str(RESULTS / "align_overlap_cpu.json"))
    args = ap.parse_args()
    setup_driver_logging(logging.WARNING)

    model = resolve_model("smollm2-135m")
    rows = chats(args.rows, args.long_every)
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    sampling = Sampling(max_tokens=args.max_tokens, temperature=0.0)
    engine = build_engine(EngineSpec.of(EngineConfig(backend="vllm", dtype="float32",
                                                     max_model_len=2048, cpu_kv_cache_gib=2.0,
                                                     max_num_seqs=64), model))
    results = []
    texts = {}
    try:
        server = EngineServer(engine, max_in_flight=args.batch_size * args.batches_in_flight)
        server.generate(rows[:2], Sampling(max_tokens=4))  # warm-up, outside the clock
        for name, run in (("one batch at a time", lambda: one_at_a_time(server, batches,
                                                                        sampling)),
                          ("overlapping", lambda: overlapping(server, batches, sampling,
                                                              args.batches_in_flight))):
            engine.llm.llm_engine.reset_prefix_cache()
            start = time.perf_counter()
            out = run()
            wall = time.perf_counter() - start
            flat = [c for b in out for c in b]
            lengths = sorted(c.completion_tokens for c in flat)
            texts[name] = [c.text for c in flat]
            results.append({"mode": name, "rows": len(flat), "wall_s": wall,
                            "rows_per_s": len(flat) / wall,
                            "output_tokens_per_s": sum(lengths) / wall,
                            "output_tokens_median": lengths[len(lengths) // 2],
                            "output_tokens_max": lengths[-1],
                            "rows_at_max_tokens": sum(n >= args.max_tokens for n in lengths)})
            print(f"{name}: {len(flat) / wall:.2f} rows/s", flush=True)
        server.stop()
    finally:
        engine.close()
    a, b = results
    report = {
        "benchmark": "align_overlap",
        "machine": host_info(),
        "load": args.load,
        "model": "SmolLM2-135M-Instruct (fp32), vLLM CPU build, greedy",
        "rows": args.rows, "batch_size": args.batch_size,
        "batches_in_flight": args.batches_in_flight, "max_tokens": args.max_tokens,
        "results": results,
        "same_texts": texts["one batch at a time"] == texts["overlapping"],
        "speedup": b["rows_per_s"] / a["rows_per_s"],
        "date": time.strftime("%Y-%m-%d"),
    }
    cols = ["mode", "rows_per_s", "output_tokens_per_s", "output_tokens_median",
            "rows_at_max_tokens", "wall_s"]
    print(" | ".join(f"{c:>20}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>20.2f}" if isinstance(r[c], float) else f"{r[c]!s:>20}"
                         for c in cols))
    print(f"speedup, overlapping over one batch at a time: {report['speedup']:.2f}x; "
          f"same texts: {report['same_texts']}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
