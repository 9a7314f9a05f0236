"""Packed-row attention on this CPU: tokens/s and peak memory by ``train.attention`` and bin length.

Run as ``python benchmarks/train_throughput.py --attention-sweep`` (or this file directly).
For each bin length (``--bins``, default 1024, 4096, 8192 tokens) and each attention
(``--attentions``, default ``dense`` = transformers' sdpa with its block-diagonal mask, and
``documents`` = palign's per-document SDPA), one child process:

- builds palign's own training step: ``palign.train.backend.start`` (one gloo process),
  ``palign.train.model.load_student`` (SmolLM2-135M, fp32, the attention under test, gradient
  checkpointing on, as long-context training runs), ``palign.train.engine.deepspeed_engine``
  (ZeRO-2, AdamW) and ``palign.train.loop.train_step``;
- packs synthetic documents (token ids drawn at random; lengths log-normal, median
  ``--median-len`` 900, clipped to 64..bin) with ``palign.train.data.pack`` into rows of the bin
  length, one row per step;
- runs ``--warmup`` steps (the first one allocates the optimizer's state), then ``--steps``
  timed ones; reports real tokens/s and the peak RSS during the timed steps (sampled every
  5 ms) over the RSS before them: the memory a step needs beyond the model and its optimizer.

A second table isolates the attention (``--probe-bins``, default 1024 to 16384): a 2-layer
Llama (hidden 256, 8 heads, 4 KV heads, vocabulary 1024, random init, fp32) runs the forward and
backward of ``palign.train.data.token_loss_sum`` on one packed row of documents of about 1000
tokens, without gradient checkpointing, in a child process per row; the peak is the address
space's high-water mark (VmHWM, reset before the step) over the RSS before it. There the rest
of the model is small, so what grows with the bin is the attention's own memory.

Prints the tables and writes JSON (default ``benchmarks/results/train_attention_cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def documents(bin_len: int, n_rows: int, median: int, seed: int, vocab: int) -> list[Any]:
    """``n_rows`` packs of ``bin_len`` tokens of synthetic documents (a third of each prompt)."""
    from palign.train.data import Example, pack

    rng = random.Random(seed)
    examples = []
    while not examples or sum(len(e) for e in examples) < n_rows * bin_len * 1.05:
        n = int(min(bin_len, max(64, rng.lognormvariate(math.log(median), 0.6))))
        ids = [rng.randrange(vocab) for _ in range(n)]
        prompt = n // 3
        examples.append(Example(f"d{len(examples)}", ids, [-100] * prompt + ids[prompt:]))
    return pack(examples, bin_len, pad_id=0)[:n_rows]


def child(attention: str, bin_len: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from palign.config import parse_config
    from palign.train.backend import start
    from palign.train.batches import collate
    from palign.train.engine import deepspeed_engine
    from palign.train.loop import train_step
    from palign.train.model import load_student

    total = args.warmup + args.steps
    cfg = parse_config({
        "run": {"name": "bench-attention", "output_dir": "runs/bench-unused",
                "stages": ["train"]},
        "data": {"path": "unused.jsonl"}, "models": {"student": "smollm2-135m"},
        "train": {"num_workers": 1, "cpus_per_worker": args.threads, "dtype": "float32",
                  "seq_len": bin_len, "max_steps": total, "attention": attention,
                  "gradient_checkpointing": True},
    })
    backend = start(cfg.train)
    _, model = load_student(cfg, torch.float32, backend.device)
    engine = deepspeed_engine(cfg, model, 1, total)
    packs = documents(bin_len, total, args.median_len, args.seed, model.config.vocab_size)
    seconds, real, docs = [], 0, []

    def step(i: int) -> None:
        nonlocal real
        t = time.perf_counter()
        train_step(engine, [collate([packs[i]], 0)], 1, backend.device)
        dt = time.perf_counter() - t
        print(f"  {attention:9s} bin {bin_len:5d} step {i + 1}: {dt:6.1f} s", flush=True)
        if i >= args.warmup:
            seconds.append(dt)
            real += packs[i].n_real
            docs.append(len(packs[i].seq_lens))

    for i in range(args.warmup):
        step(i)
    from palign.data.procmem import RssSampler, rss_mib

    base = rss_mib()
    with RssSampler(period=0.005, label="steps") as sampler:
        for i in range(args.warmup, total):
            step(i)
    peak = sampler.peaks["steps"]
    return {"attention": attention, "bin": bin_len, "timed_steps": len(seconds),
            "real_tokens_per_s": real / sum(seconds), "step_seconds": seconds,
            "documents_per_row": docs, "peak_rss_over_start_mib": peak - base,
            "rss_before_steps_mib": base}


def probe(attention: str, bin_len: int, threads: int) -> dict[str, Any]:
    """The attention-bound shape's forward and backward on one row of ``bin_len`` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from palign.data import procmem
    from palign.train import attention as attn
    from palign.train.data import IGNORE_INDEX, token_loss_sum

    torch.set_num_threads(threads)
    name = attn.implementation(attention, torch.device("cpu"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=bin_len,
        attn_implementation=name)).float().train()
    doc = 1000
    position_ids = torch.cat([torch.arange(min(doc, bin_len - i))
                              for i in range(0, bin_len, doc)]).unsqueeze(0)
    ids = torch.randint(0, 1024, (1, bin_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, ::2] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    procmem.reset_peak()
    before = procmem.rss_mib()
    t = time.perf_counter()
    loss, _ = token_loss_sum(model, batch, 1024)
    loss.backward()
    seconds = time.perf_counter() - t
    return {"attention": attention, "bin": bin_len, "seconds": seconds,
            "tokens_per_s": bin_len / seconds,
            "peak_over_start_mib": procmem.peak_rss_mib() - before,
            "documents_per_row": int((position_ids == 0).sum())}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", default="1024,4096,8192")
    ap.add_argument("--attentions", default="dense,documents")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--median-len", type=int, default=900)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_attention_cpu.json"))
    ap.add_argument("--probe-bins", default="1024,4096,8192,16384")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # "attention,bin": one row, JSON out
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # "attention,bin": one probe row
    args = ap.parse_args(argv)
    if args.child:
        attention, bin_len = args.child.split(",")
        print("RESULT " + json.dumps(child(attention, int(bin_len), args)), flush=True)
        return 0
    if args.probe:
        attention, bin_len = args.probe.split(",")
        print("RESULT " + json.dumps(probe(attention, int(bin_len), args.threads)), flush=True)
        return 0
    from host import host_info

    def run(flag: str, attention: str, bin_len: int) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), flag, f"{attention},{bin_len}",
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--median-len",
               str(args.median_len), "--threads", str(args.threads), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {"attention": attention, "bin": bin_len,
                   "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        else:
            row = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(row), flush=True)
        return row

    probes = [run("--probe", attention, int(b)) for b in args.probe_bins.split(",") if b
              for attention in args.attentions.split(",")]
    rows = [run("--child", attention, int(b)) for b in args.bins.split(",") if b
            for attention in args.attentions.split(",")]
    report = {
        "benchmark": "train_attention",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": host_info(),
        "what": "palign's train_step (ZeRO-2, fp32, gradient checkpointing) on SmolLM2-135M, "
                "one packed row per step; documents log-normal, median "
                f"{args.median_len} tokens; {args.warmup} warm-up + {args.steps} timed steps",
        "rows": rows,
        "attention_probe": {
            "what": "2-layer Llama (hidden 256, 8 heads, 4 KV heads, vocab 1024), forward and "
                    "backward of token_loss_sum on one packed row of ~1000-token documents, no "
                    "gradient checkpointing; peak = VmHWM (reset first) over the RSS before",
            "rows": probes},
    }
    print(f"\n{'attention':10s} {'bin':>6s} {'docs/row':>8s} {'tokens/s':>9s} "
          f"{'peak MiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention']:10s} {r['bin']:6d}  {r['error']}")
            continue
        docs = sum(r["documents_per_row"]) / max(1, len(r["documents_per_row"]))
        print(f"{r['attention']:10s} {r['bin']:6d} {docs:8.1f} {r['real_tokens_per_s']:9.1f} "
              f"{r['peak_rss_over_start_mib']:9.0f}")
    print(f"\nattention only: {'attention':10s} {'bin':>6s} {'docs':>5s} {'tokens/s':>9s} "
          f"{'peak MiB':>9s}")
    for r in probes:
        if "error" in r:
            print(f"{r['attention']:10s} {r['bin']:6d}  {r['error']}")
            continue
        print(f"{'':16s}{r['attention']:10s} {r['bin']:6d} {r['documents_per_row']:5d} "
              f"{r['tokens_per_s']:9.0f} {r['peak_over_start_mib']:9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
