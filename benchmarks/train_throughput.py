"""Student SFT throughput on this CPU: packed against padded micro-batches, same model, same loss.

The student is SmolLM2-135M (``palign.engines.models.resolve_model("smollm2-135m")``, fp32, sdpa),
the examples are the demo's aligned rows (``runs/demo/align/``) when they exist, else 64 synthetic
rows whose targets run from 100 to 1500 tokens (log-uniform); the output says which. Both are
turned into examples by ``palign.train.data.example_from_row`` and then

(a) packed: ``pack(examples, seq_len)`` + ``collate_packs``, one pack per optimizer step;
(b) padded: ``pad_batch`` over micro-batches of consecutive examples (a seeded shuffle) grown
    while ``rows x longest <= seq_len``, so one step has a token budget like a pack's.

The training step is palign's own: ``backend.start`` (one gloo process, DeepSpeed comm),
``model.load_student`` (``--attention``, default auto), ``engine.deepspeed_engine`` (DeepSpeed
ZeRO-2, torch AdamW client optimizer, fp32) and ``loop.train_step``, one micro-batch per
optimizer step. ``--attention-sweep`` instead runs ``train_attention.py`` (attention variants
by bin length: tokens/s and peak memory).
Warm-up steps (on the smallest padded micro-batch) are followed by packed and padded steps
interleaved, so both see the same load from whatever else runs on the machine; the timed phase
stops early once ``--budget-s`` is spent (at least one step of each).

Reported per mode: real (non-pad) tokens/s, slot tokens/s (pads included), supervised tokens/s,
packing efficiency (real / slots) of the timed steps and of the whole data set, the time one
epoch would take at the measured slot rate, and peak RSS while the mode's steps ran (sampled
every 20 ms). Prints a table and writes JSON (default
``benchmarks/results/train_throughput_cpu.json``).

    python benchmarks/train_throughput.py [--steps 3] [--warmup 1] [--seq-len 2048] [--synthetic]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing palign
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from host import host_info  # noqa: E402

from palign.common.logs import setup_driver_logging  # noqa: E402
from palign.config import Config, parse_config  # noqa: E402
from palign.data.procmem import RssSampler  # noqa: E402
from palign.data.shards import read_rows  # noqa: E402
from palign.train.data import (  # noqa: E402
    IGNORE_INDEX,
    Example,
    Untrainable,
    collate_packs,
    example_from_row,
    pack,
    packing_efficiency,
    pad_batch,
)
from palign.train.loop import MicroBatch, train_step  # noqa: E402

DEMO_ALIGN = ROOT / "runs" / "demo" / "align"
STUDENT = "smollm2-135m"
GIB = 1024**3

WORDS = (
    "let the sum of both sides be equal so we subtract three from each term and divide by two "
    "then the value of x is four which we check by substitution into the first equation the "
    "area of the triangle is half the base times the height therefore the answer is twelve "
    "now consider the remaining case where n is odd and the product is negative"
).split()
QUESTIONS = (
    "Find all real x with x^2 - 5x + 6 = 0.",
    "A triangle has sides 5, 12 and 13. What is its area?",
    "How many positive divisors does 360 have?",
    "Compute the sum of the first 50 odd numbers.",
)


def machine_info() -> dict[str, Any]:
    """Host, CPU model, usable cores, Python and torch versions, load average now."""
    import deepspeed
    import transformers

    return {**host_info(), "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "loadavg_start": list(os.getloadavg())}


def synthetic_rows(tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` align-like rows whose targets are 100..1500 tokens long (log-uniform)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        want = round(math.exp(rng.uniform(math.log(100), math.log(1500))))
        words = [rng.choice(WORDS) for _ in range(want * 2)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:want]
        rows.append({"id": f"synth-{i:03d}", "question": rng.choice(QUESTIONS),
                     "target": tokenizer.decode(ids)})
    return rows


def padded_groups(examples: Sequence[Example], budget: int, seed: int) -> list[list[Example]]:
    """Consecutive examples of a seeded shuffle, grown while ``rows x longest <= budget``."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    groups: list[list[Example]] = []
    group: list[Example] = []
    for ex in order:
        width = max([len(e) for e in group] + [len(ex)])
        if group and (len(group) + 1) * width > budget:
            groups.append(group)
            group = []
        group.append(ex)
    if group:
        groups.append(group)
    return groups


def make_config(args: argparse.Namespace, total_steps: int) -> Config:
    return parse_config({
        "run": {"name": "bench-train-throughput", "output_dir": "runs/bench-unused",
                "stages": ["train"]},
        "data": {"path": "unused.jsonl"},
        "models": {"student": STUDENT},
        "train": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": args.threads,
                  "zero_stage": 2, "dtype": "float32", "seq_len": args.seq_len,
                  "micro_batch_size": 1, "grad_accum": 1, "max_steps": total_steps,
                  "attention": args.attention, "loss_chunk_size": args.loss_chunk_size},
    })


def batch_counts(batch: dict[str, torch.Tensor], real: int | None = None) -> dict[str, int]:
    """Slots, real (non-pad) tokens and supervised tokens of a collated micro-batch.

    A padded batch counts its real tokens from the attention mask; a packed one has no mask,
    so the caller passes ``Pack.n_real``.
    """
    slots = int(batch["input_ids"].numel())
    if real is None:
        real = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {"slots": slots, "real": real, "supervised": supervised}


def run_step(engine: Any, batch: dict[str, torch.Tensor], counts: dict[str, int]) -> float:
    """One optimizer step: the loop's own ``train_step`` (world 1, no accumulation)."""
    micro = MicroBatch(batch, counts["supervised"], counts["real"])
    return train_step(engine, [micro], 1, torch.device("cpu")).loss


def summarise(mode: str, steps: list[dict[str, Any]], peak_rss_mib: float,
              dataset_slots: int, dataset_real: int, units: int) -> dict[str, Any]:
    secs = sum(s["seconds"] for s in steps)
    real = sum(s["real"] for s in steps)
    slots = sum(s["slots"] for s in steps)
    sup = sum(s["supervised"] for s in steps)
    slot_rate = slots / secs
    return {
        "mode": mode, "timed_steps": len(steps), "seconds": secs,
        "real_tokens": real, "slot_tokens": slots, "supervised_tokens": sup,
        "real_tokens_per_s": real / secs, "slot_tokens_per_s": slot_rate,
        "supervised_tokens_per_s": sup / secs,
        "efficiency_timed": real / slots,
        "efficiency_dataset": dataset_real / dataset_slots,
        "units_per_epoch": units, "dataset_slots": dataset_slots,
        "epoch_seconds_at_measured_rate": dataset_slots / slot_rate,
        "step_seconds": [round(s["seconds"], 3) for s in steps],
        "step_seconds_median": statistics.median(s["seconds"] for s in steps),
        "losses": [round(s["loss"], 4) for s in steps],
        "peak_rss_gib": peak_rss_mib / 1024,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (at most)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="stop the timed phase after the step pair that passes this many s")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--loss-chunk-size", type=int, default=1024)
    ap.add_argument("--attention", default="auto", help="train.attention for both modes")
    ap.add_argument("--attention-sweep", action="store_true",
                    help="instead: attention variants by bin length (train_attention.py; the "
                         "arguments after this flag go to it)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--synthetic", action="store_true", help="ignore the demo's aligned rows")
    ap.add_argument("--synthetic-rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput_cpu.json"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--attention-sweep" in argv:
        import train_attention

        return train_attention.main(argv[argv.index("--attention-sweep") + 1:])
    args = ap.parse_args(argv)
    setup_driver_logging(logging.WARNING)

    from palign.engines.models import resolve_model
    from palign.train.backend import start
    from palign.train.engine import deepspeed_engine
    from palign.train.model import load_student

    machine = machine_info()
    total_steps = args.warmup + 2 * args.steps
    cfg = make_config(args, total_steps)
    backend = start(cfg.train)  # gloo; torch threads = cpus_per_worker
    t0 = time.perf_counter()
    tokenizer, model = load_student(cfg, torch.float32, backend.device)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                 else tokenizer.eos_token_id)

    demo = [] if args.synthetic or not DEMO_ALIGN.is_dir() else list(read_rows(DEMO_ALIGN))
    demo = [r for r in demo if isinstance(r.get("question"), str)
            and isinstance(r.get("target"), str)]
    if demo:
        rows = sorted(demo, key=lambda r: str(r["id"]))
        source = f"demo aligned rows ({DEMO_ALIGN.relative_to(ROOT)}, {len(rows)} rows)"
    else:
        rows = synthetic_rows(tokenizer, args.synthetic_rows, args.seed)
        source = (f"synthetic ({len(rows)} rows, targets 100..1500 tokens log-uniform, "
                  f"seed {args.seed})")
    built = [example_from_row(tokenizer, r, args.seq_len) for r in rows]
    examples = [e for e in built if isinstance(e, Example)]
    rejected = [e for e in built if isinstance(e, Untrainable)]
    lengths = sorted(len(e) for e in examples)

    packs = pack(examples, args.seq_len, pad_id)
    random.Random(args.seed).shuffle(packs)
    groups = padded_groups(examples, args.seq_len, args.seed)
    padded_slots = sum(len(g) * max(len(e) for e in g) for g in groups)
    pack_real = [p.n_real for p in packs]

    t0 = time.perf_counter()
    engine = deepspeed_engine(cfg, model, backend.world, total_steps)
    engine_s = time.perf_counter() - t0

    smallest = min(groups, key=lambda g: len(g) * max(len(e) for e in g))
    results: dict[str, list[dict[str, Any]]] = {"packed": [], "padded": []}
    with RssSampler() as rss:
        rss.label = "warmup"
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            batch = pad_batch(smallest, pad_id)
            run_step(engine, batch, batch_counts(batch))
        warm_s = time.perf_counter() - t0
        timed_start = time.perf_counter()
        for i in range(args.steps):
            for mode in ("packed", "padded"):
                rss.label = mode
                if mode == "packed":
                    unit = packs[i % len(packs)]
                    batch = collate_packs([unit])
                    counts = batch_counts(batch, unit.n_real)
                else:
                    batch = pad_batch(groups[i % len(groups)], pad_id)
                    counts = batch_counts(batch)
                t = time.perf_counter()
                loss = run_step(engine, batch, counts)
                dt = time.perf_counter() - t
                results[mode].append({**counts, "seconds": dt, "loss": loss,
                                      "rows": int(batch["input_ids"].shape[0])})
                print(f"  {mode:6s} step {i + 1}: {dt:7.1f} s  {counts['real']:5d} real / "
                      f"{counts['slots']:5d} slots  loss {loss:.3f}", flush=True)
            rss.label = None
            if time.perf_counter() - timed_start > args.budget_s and i + 1 < args.steps:
                print(f"  budget of {args.budget_s:.0f} s spent: stopping after {i + 1} pairs")
                break
        peaks = dict(rss.peaks)

    modes = {
        "packed": summarise("packed", results["packed"], peaks.get("packed", 0),
                            len(packs) * args.seq_len, sum(pack_real), len(packs)),
        "padded": summarise("padded", results["padded"], peaks.get("padded", 0),
                            padded_slots, sum(lengths), len(groups)),
    }
    modes["packed"]["packing_efficiency_palign"] = packing_efficiency(packs)
    modes["padded"]["rows_per_micro_batch"] = {
        "min": min(len(g) for g in groups), "max": max(len(g) for g in groups),
        "mean": len(examples) / len(groups)}
    machine["loadavg_end"] = list(os.getloadavg())
    report = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "data": {"source": source, "rows": len(rows), "examples": len(examples),
                 "rejected": [f"{r.id}: {r.reason}" for r in rejected],
                 "tokens": sum(lengths), "length_min": lengths[0],
                 "length_median": statistics.median(lengths), "length_max": lengths[-1],
                 "length_mean": sum(lengths) / len(lengths), "seq_len": args.seq_len},
        "model": {"name": STUDENT, "path": resolve_model(STUDENT), "params": n_params,
                  "dtype": "float32", "attention": args.attention, "load_s": load_s},
        "engine": {
            "what": "palign.train: backend.start (1 process, gloo) + engine.deepspeed_engine "
                    "(DeepSpeed ZeRO-2, torch AdamW client optimizer, fp32, grad clip "
                    f"{cfg.train.grad_clip}); loss = LossModule -> token_loss_sum "
                    f"(chunk {args.loss_chunk_size}); one micro-batch per optimizer step",
            "threads": torch.get_num_threads(), "init_s": engine_s,
            "warmup_steps": args.warmup, "warmup_s": warm_s,
        },
        "modes": modes,
        "speedup_packed_over_padded_real_tokens_per_s":
            modes["packed"]["real_tokens_per_s"] / modes["padded"]["real_tokens_per_s"],
        "peak_rss_process_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "note": "2 shared cores: other processes' load (loadavg) moves the absolute rates; "
                "packed and padded steps are interleaved so that both see the same load",
    }
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n{report['data']['source']}; {report['data']['examples']} examples, "
          f"{report['data']['tokens']} tokens (median {report['data']['length_median']}, "
          f"max {report['data']['length_max']}); seq_len {report['data']['seq_len']}")
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, load "
          f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    head = (f"{'mode':7s} {'steps':>5s} {'real tok/s':>10s} {'slot tok/s':>10s} "
            f"{'sup tok/s':>9s} {'eff(steps)':>10s} {'eff(data)':>9s} {'units':>5s} "
            f"{'epoch s':>8s} {'RSS GiB':>7s}")
    print(head)
    print("-" * len(head))
    for r in report["modes"].values():
        print(f"{r['mode']:7s} {r['timed_steps']:5d} {r['real_tokens_per_s']:10.1f} "
              f"{r['slot_tokens_per_s']:10.1f} {r['supervised_tokens_per_s']:9.1f} "
              f"{r['efficiency_timed']:10.3f} {r['efficiency_dataset']:9.3f} "
              f"{r['units_per_epoch']:5d} {r['epoch_seconds_at_measured_rate']:8.0f} "
              f"{r['peak_rss_gib']:7.2f}")
    print(f"packed / padded real tokens/s: "
          f"{report['speedup_packed_over_padded_real_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
