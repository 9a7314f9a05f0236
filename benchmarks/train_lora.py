"""LoRA against full fine-tuning of SmolLM2-135M on this CPU: the same packed rows, palign's own
training step, each mode in a fresh process.

The rows are the demo's aligned rows (``runs/demo/align/``) when they exist, else synthetic
align-like rows (targets of 100 to 1500 tokens, log-uniform; ``train_throughput.py``'s); the
output says which. They are tokenised with ``example_from_row`` and packed into bins of
``--seq-len`` tokens. Each mode then runs palign's loop parts in one gloo process:
``backend.start``, ``model.load_student`` (fp32; with ``train.lora`` the PEFT model),
``engine.deepspeed_engine`` (ZeRO-2, torch AdamW) and ``loop.train_step``, one packed bin per
optimizer step, ``--warmup`` untimed steps then ``--steps`` timed ones over the same bins in the
same order, and finally ``checkpoints.save`` as the loop saves (a LoRA run: no frozen weight).
Both modes run without and then with gradient checkpointing (without it, the activations of a
1024-token bin dominate the process's memory on this CPU and hide what LoRA saves).

Reported per mode: trainable and total parameters, median step time and real tokens/s, peak
RSS of the process (sampled every 20 ms from the model's load to the end, and per phase: load
and engine set-up, training steps, checkpoint save), the checkpoint's size, and the losses.
Prints a table and writes JSON (default ``benchmarks/results/train_lora_cpu.json``), naming the
machine.

    python benchmarks/train_lora.py [--steps 6] [--seq-len 1024] [--rank 16] [--dropout 0.05]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing palign
    sys.path.insert(0, str(ROOT))

STUDENT = "smollm2-135m"
MODES = ("full", "lora")


def packed_rows(seq_len: int, n_rows: int, seed: int) -> tuple[list[Any], str]:
    """The bins both modes train on, and where their rows came from."""
    from train_throughput import DEMO_ALIGN, synthetic_rows
    from transformers import AutoTokenizer

    from palign.data.shards import read_rows
    from palign.engines.models import resolve_model
    from palign.train.data import Example, example_from_row, pack

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(STUDENT))
    if DEMO_ALIGN.is_dir() and any(DEMO_ALIGN.glob("part-*")):
        rows, source = list(read_rows(DEMO_ALIGN)), f"demo aligned rows ({DEMO_ALIGN})"
    else:
        rows, source = synthetic_rows(tokenizer, n_rows, seed), "synthetic align-like rows"
    examples = [e for r in rows
                if isinstance(e := example_from_row(tokenizer, r, seq_len, "truncate"), Example)]
    return pack(examples, seq_len, tokenizer.pad_token_id or 0), source


def child(mode: str, args: argparse.Namespace, out: Path) -> None:
    """One mode in this process: load, train, save a checkpoint; JSON to ``out``."""
    import torch

    from palign.config import parse_config
    from palign.data.procmem import RssSampler
    from palign.train import checkpoints
    from palign.train.backend import start
    from palign.train.batches import collate
    from palign.train.engine import deepspeed_engine
    from palign.train.loop import train_step
    from palign.train.lora import parameter_counts
    from palign.train.model import load_student

    packs, source = packed_rows(args.seq_len, args.rows, args.seed)
    n_steps = args.warmup + args.steps
    lora = {"r": args.rank, "alpha": args.rank, "dropout": args.dropout} if mode == "lora" else None
    cfg = parse_config({
        "data": {"path": "unused.jsonl"}, "models": {"student": STUDENT},
        "train": {"num_workers": 1, "cpus_per_worker": args.threads, "dtype": "float32",
                  "seq_len": args.seq_len, "max_steps": n_steps, "lr": 1e-4,
                  "gradient_checkpointing": args.gradient_checkpointing, "lora": lora}})
    with RssSampler(label="load") as rss:
        backend = start(cfg.train)
        torch.manual_seed(0)
        _, model = load_student(cfg, torch.float32, backend.device)
        trainable, total = parameter_counts(model)
        engine = deepspeed_engine(cfg, model, 1, n_steps)
        rss.label = "train"
        seconds, tokens, losses = [], [], []
        for i in range(n_steps):
            micro = collate([packs[i % len(packs)]], 0)
            t0 = time.perf_counter()
            result = train_step(engine, [micro], 1, backend.device)
            if i >= args.warmup:
                seconds.append(time.perf_counter() - t0)
                tokens.append(result.real)
            losses.append(round(result.loss, 4))
        rss.label = "save"
        folder = Path(tempfile.mkdtemp(prefix=f"palign-bench-{mode}-"))
        try:
            checkpoints.save(engine, folder, 0, {"step": n_steps}, adapters_only=lora is not None)
            ckpt = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    out.write_text(json.dumps({
        "mode": mode, "rows": source, "bins": len(packs), "trainable_params": trainable,
        "total_params": total, "step_seconds": [round(s, 3) for s in seconds],
        "step_seconds_median": statistics.median(seconds),
        "real_tokens_per_s": sum(tokens) / sum(seconds),
        "peak_rss_mib": max(rss.peaks.values()), "peak_rss_mib_by_phase": rss.peaks,
        "checkpoint_bytes": ckpt, "losses": losses}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=48, help="synthetic rows (without demo rows)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = r, the paper's)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the paper's 0.05)")
    ap.add_argument("--checkpointing", choices=("both", "off", "on"), default="both",
                    help="gradient checkpointing: off, on, or both in turn (default)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_lora_cpu.json"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args, Path(args.child_out))
        return 0

    from host import host_info

    runs = []
    settings = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    for checkpointing in settings:
        results = []
        with tempfile.TemporaryDirectory() as work:
            for mode in MODES:  # each in a fresh process: its own peak memory
                out = Path(work) / f"{mode}.json"
                cmd = [sys.executable, __file__, "--child", mode, "--child-out", str(out),
                       *sys.argv[1:]]
                if checkpointing:
                    cmd.append("--gradient-checkpointing")
                subprocess.run(cmd, check=True, cwd=ROOT / "benchmarks")
                results.append(json.loads(out.read_text()))
        full, lora = results
        runs.append({"gradient_checkpointing": checkpointing, "modes": results,
                     "lora_over_full": {
                         "step_time": lora["step_seconds_median"] / full["step_seconds_median"],
                         "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
                         "checkpoint": lora["checkpoint_bytes"] / full["checkpoint_bytes"]}})
    print(f"rows: {runs[0]['modes'][0]['rows']}, {runs[0]['modes'][0]['bins']} bins of "
          f"{args.seq_len} tokens; {args.steps} timed steps per mode (after {args.warmup} "
          f"warm-up); LoRA r {args.rank}, alpha {args.rank}, dropout {args.dropout}")
    print(f"{'ckpt':<5}{'mode':<6}{'trainable':>14}{'step s':>9}{'tokens/s':>10}"
          f"{'peak RSS MiB':>14}{'(load/train/save)':>20}{'checkpoint MiB':>16}")
    for run in runs:
        for r in run["modes"]:
            phases = "/".join(f"{r['peak_rss_mib_by_phase'].get(k, 0):.0f}"
                              for k in ("load", "train", "save"))
            print(f"{'yes' if run['gradient_checkpointing'] else 'no':<5}{r['mode']:<6}"
                  f"{r['trainable_params']:>14,}{r['step_seconds_median']:>9.2f}"
                  f"{r['real_tokens_per_s']:>10.0f}{r['peak_rss_mib']:>14.0f}{phases:>20}"
                  f"{r['checkpoint_bytes'] / 2**20:>16.1f}")
        ratio = run["lora_over_full"]
        print(f"     LoRA / full: step time {ratio['step_time']:.2f}, peak RSS "
              f"{ratio['peak_rss']:.2f}, checkpoint {ratio['checkpoint']:.3f}")
    report = {"benchmark": "train_lora", "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "machine": host_info(), "student": STUDENT, "seq_len": args.seq_len,
              "lora": {"r": args.rank, "alpha": args.rank, "dropout": args.dropout,
                       "target_modules": "all-linear"},
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
