"""Student SFT step throughput and MFU on one GPU: palign's DeepSpeed loop against plain PyTorch.

Models: random-init Qwen2.5-0.5B- and 1.5B-shaped ``Qwen2ForCausalLM`` (tied embeddings, vocab
151936, bf16). Data: synthetic token ids; sequence lengths log-normal (median ``--median-len``
900, clipped to 64..seq_len), prompt share 15..45 % (about 70 % of the tokens supervised).
Micro-batch 4, one micro-batch per optimizer step. Modes:

- ``palign``: palign's shipped training code as is, on one process: ``palign.train.backend.
  start`` (``deepspeed.init_distributed("nccl")``), the model loaded with the attention
  ``train.attention`` picks (``auto``: flash-attn's varlen kernel where it imports, else
  per-document SDPA: no S x S mask), ``palign.train.engine.deepspeed_engine`` (ZeRO-2, bf16
  with fp32 master weights, the fused AdamW ``train.fused_optimizer: auto`` picks, grad clip
  1.0) and ``palign.train.loop.train_step`` on packed rows (``palign.train.data.pack``,
  ``--seq-len`` 4096, position ids restarting per sequence);
- ``plain``: the baseline: the same model in bf16 on **unpacked** rows (each row one unbroken
  sequence of ``--seq-len`` tokens: sdpa's flash kernel, no mask), fused AdamW on it (no master
  weights, ``palign.train.engine.param_groups``), HF's own loss from the full logits,
  ``clip_grad_norm_`` 1.0;
- ``palign-zero3``: ``palign`` under ZeRO-3; ``palign-gc``: ``palign`` with gradient
  checkpointing;
- ``palign-long``: ``palign`` on one row of ``--long-seq`` tokens (32768; one sequence),
  micro-batch 1, gradient checkpointing: whether a long reasoning sample fits, and its rate;
- ``palign-lora``: ``palign`` with the paper's LoRA adapters (``train.lora``: r 16, alpha 16,
  all linear layers; ``palign.train.lora.apply_lora``) and gradient checkpointing, ZeRO-2,
  bf16; ``palign-lora-long``: the same on one ``--long-seq`` row (``--lora`` runs both on the
  7B shape: the paper's one-GPU recipe).

LoRA rows count the frozen base's forward and backward in ``mfu`` (6 N over every parameter,
as a full fine-tuning row would), and ``mfu_lora`` counts only what LoRA computes (the frozen
weights need no weight gradient: 4 N_base + 6 N_adapters).

Settings a run needs are palign's config fields (``train.attention``, ``train.fused_optimizer``,
``train.deepspeed`` for DeepSpeed overrides, ``--deepspeed`` here): nothing is patched.

Each (shape, mode) runs in a child process of its own (an OOM or a hang loses one row, and the
peak memory is that row's). Per row: warm-up steps, then timed steps (``torch.cuda.
synchronize`` around each), real (non-pad) tokens/s and

    MFU = tokens/s x (6 N + 12 L H S / 2) / peak

with N the parameters (tied embeddings once), L layers, H hidden size, S the mean packed
sequence length weighted by tokens (sum len^2 / sum len over the timed rows' sequences: each
token attends to S/2 tokens on average under the causal mask), peak ``--peak-tflops`` (790, the
bf16 dense rate measured on these H100/H200s). ``mfu_notes`` is the STACK-NOTES convention
(6 N + 12 L H seq_len, not halved, slot tokens/s): the reference numbers there (plain 0.41 /
0.55, ZeRO-2 0.34 / 0.48) are reproduced by that formula, so compare with them in
``--layout full`` only. Both modes get the same formula, so within a shape MFU ratios equal
tokens/s ratios. Peak GPU memory is ``torch.cuda.max_memory_allocated`` (and reserved).

Prints a table and writes JSON (machine, formula, rows) to ``$OUT/train_mfu.json`` when OUT is
set, else ``benchmarks/results/train_mfu_gpu.json``. ``--smoke`` checks the script on a CPU: a
tiny config, fp32, gloo, a few steps, every mode (the JSON then goes to the temp folder).

    python3 benchmarks/gpu/train_mfu.py [--shapes 0.5b,1.5b] [--modes palign,plain]
    python3 benchmarks/gpu/train_mfu.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing palign
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
VOCAB = 151936
SHAPES: dict[str, dict[str, int]] = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": VOCAB},
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": VOCAB},
    # Qwen2.5-7B-Instruct's shape (untied head, vocab 152064): the paper's student, for LoRA
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 4096},
}
MODES = ("palign", "plain", "palign-zero3", "palign-gc", "palign-long", "palign-lora",
         "palign-lora-long")
LORA_MODES = ("palign-lora", "palign-lora-long")
LONG_MODES = ("palign-long", "palign-lora-long")
# the paper's adapters (configs/paper/recipe.yaml): r 16, alpha 16 on every linear layer
LORA = {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
FORMULA = ("MFU = real tokens/s x (6 N + 12 L H S / 2) / peak; N = parameters (tied embeddings "
           "once), L = layers, H = hidden size, S = mean packed sequence length weighted by "
           "tokens (sum len^2 / sum len), /2 for the causal mask. mfu_notes (STACK-NOTES' "
           "convention) = slot tokens/s x (6 N + 12 L H seq_len) / peak")


# ------------------------------------------------------------------------------ data


def make_examples(n_rows: int, seq_len: int, vocab: int, layout: str, median_len: int,
                  seed: int) -> list[Any]:
    """Synthetic ``Example``s with enough tokens for about ``n_rows`` packed rows."""
    from palign.train.data import IGNORE_INDEX, Example

    rng = random.Random(seed)
    examples: list[Example] = []
    total = 0
    while total < n_rows * seq_len * 1.02:
        if layout == "full":
            n = seq_len
        else:
            n = int(min(seq_len, max(64, math.exp(rng.gauss(math.log(median_len), 0.7)))))
        prompt = max(1, round(n * rng.uniform(0.15, 0.45)))
        ids = [rng.randrange(vocab) for _ in range(n)]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(Example(f"ex{len(examples)}", ids, labels))
        total += n
    return examples


def make_packs(n_rows: int, seq_len: int, layout: str, args: argparse.Namespace,
               vocab: int) -> tuple[list[Any], dict]:
    """``n_rows`` packs (cycled if BFD made fewer), in a seeded shuffle, and their statistics."""
    from palign.train.data import pack, packing_efficiency

    examples = make_examples(n_rows, seq_len, vocab, layout, args.median_len,
                             args.seed)
    packs = pack(examples, seq_len, pad_id=0)
    random.Random(args.seed).shuffle(packs)
    rows = [packs[i % len(packs)] for i in range(n_rows)]
    lens = [n for p in rows for n in p.seq_lens]
    stats = {"packs_made": len(packs), "packing_efficiency": packing_efficiency(packs),
             "sequences": len(lens), "mean_seq_len": sum(lens) / len(lens),
             "token_weighted_seq_len": sum(n * n for n in lens) / sum(lens)}
    return rows, stats


# ------------------------------------------------------------------------------ child


def train_config(args: argparse.Namespace, mode: str, total_steps: int) -> Any:
    from palign.config import parse_config

    long = mode in LONG_MODES
    lora = mode in LORA_MODES

    return parse_config({
        "run": {"name": "bench-train-mfu", "output_dir": "runs/bench-unused",
                "stages": ["train"]},
        "data": {"path": "unused.jsonl"},
        "models": {"student": "unused"},
        "train": {
            "num_workers": 1, "use_gpu": not args.smoke,
            # smoke: one thread (OpenMP threads spin badly on a loaded 2-core machine)
            "cpus_per_worker": 1 if args.smoke else len(os.sched_getaffinity(0)),
            "zero_stage": 3 if mode == "palign-zero3" else 2,
            "dtype": "float32" if args.smoke else "bfloat16",
            "seq_len": args.long_seq if long else args.seq_len,
            "micro_batch_size": 1 if long else args.micro_batch, "grad_accum": 1,
            "max_steps": total_steps,
            "gradient_checkpointing": mode in ("palign-gc", "palign-long") or lora,
            "lora": LORA if lora else None,
            "loss_chunk_size": args.loss_chunk_size,
            "deepspeed": json.loads(args.deepspeed) if args.deepspeed else {},
        },
    })


def build_model(shape: str, dtype: Any, device: Any, checkpointing: bool, attn: str) -> Any:
    """A random-init Qwen2 causal LM of ``shape``, made directly on ``device``, with the
    transformers attention implementation ``attn``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{"tie_word_embeddings": True, "max_position_embeddings": 32768,
                         "rms_norm_eps": 1e-6, "use_cache": False, **SHAPES[shape]})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def profile_step(step: Any, label: str) -> None:
    """One extra, untimed step under torch.profiler: where its CUDA and CPU time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6
    print(f"== profile {label}: step {wall:.3f} s (profiled), GPU busy {kernel_s:.3f} s",
          flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60),
          flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
          flush=True)


def adamw_kind(optimizer: Any) -> str:
    """Which torch AdamW implementation ``optimizer`` asks for."""
    defaults = getattr(optimizer, "defaults", {}) or {}
    if defaults.get("fused"):
        return "fused"
    foreach = defaults.get("foreach")
    if foreach is None:
        return "default (foreach on CUDA, for-loop on CPU)"
    return "foreach" if foreach else "for-loop"


def run_child(args: argparse.Namespace, shape: str, mode: str) -> dict[str, Any]:
    """Build, warm up and time one (shape, mode); the result row (raises on failure)."""
    import torch

    from palign.train.batches import collate
    from palign.train.engine import deepspeed_engine, param_groups
    from palign.train.loop import train_step

    if args.smoke:
        sys.modules.setdefault("ray", None)  # type: ignore[arg-type]  # as on the GPU machine
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --smoke on a CPU)")
    from palign.common.logs import setup_driver_logging

    setup_driver_logging(logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "palign"):
        logging.getLogger(name).setLevel(logging.WARNING)
    total = args.warmup + args.steps
    cfg = train_config(args, mode, total)
    tc = cfg.train
    t0 = time.perf_counter()
    if mode == "plain":
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(int(tc.cpus_per_worker))
        attn = "sdpa"
    else:
        from palign.train.attention import implementation
        from palign.train.backend import start

        device = start(tc).device  # deepspeed.init_distributed(nccl|gloo)
        attn = implementation(tc.attention, device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(shape, dtype, device, tc.gradient_checkpointing, attn)
    n_adapters = 0
    if tc.lora is not None:  # as load_student does it
        from palign.train.lora import apply_lora, parameter_counts

        model = apply_lora(model, tc.lora)
        n_adapters, _ = parameter_counts(model)
    n_params = sum(p.numel() for p in model.parameters())
    mc = model.config
    optimizer: Any = None
    engine: Any = None
    if mode == "plain":
        optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr,
                                      betas=(0.9, 0.95), eps=1e-8, fused=True)
    else:
        engine = deepspeed_engine(cfg, model, 1, total)
    init_s = time.perf_counter() - t0

    # plain: unpacked rows (one sequence each); palign-long: one long sequence per step
    layout = "full" if mode in ("plain", *LONG_MODES) else args.layout
    packs, data_stats = make_packs(total * tc.micro_batch_size, tc.seq_len, layout, args,
                                   mc.vocab_size)
    steps: list[dict[str, float]] = []
    timed_lens: list[int] = []

    def one_step(units: list[Any]) -> tuple[dict[str, Any], int, float]:
        micro = collate(units, 0)
        if engine is not None:  # palign's own step
            loss = train_step(engine, [micro], 1, device).loss
        else:
            batch = {k: v.to(device, non_blocking=True) for k, v in micro.batch.items()}
            out = model(**batch, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            del out
        return micro.batch, micro.supervised, loss

    for i in range(total):
        units = packs[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        cpu_batch, n_sup, loss = one_step(units)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if i >= args.warmup:
            steps.append({"seconds": dt, "real": sum(p.n_real for p in units),
                          "slots": cpu_batch["input_ids"].numel(), "supervised": n_sup,
                          "loss": loss})
            timed_lens += [n for p in units for n in p.seq_lens]
        print(f"    {shape} {mode} step {i + 1}/{total}{' (warm-up)' if i < args.warmup else ''}"
              f": {dt:.3f} s, loss {loss:.3f}", flush=True)
    if args.profile and cuda:
        profile_step(lambda: one_step(packs[:tc.micro_batch_size]), f"{shape} {mode}")

    secs = sum(s["seconds"] for s in steps)
    real_rate = sum(s["real"] for s in steps) / secs
    slot_rate = sum(s["slots"] for s in steps) / secs
    layers, hidden = mc.num_hidden_layers, mc.hidden_size
    s_eff = sum(n * n for n in timed_lens) / sum(timed_lens)
    attn_flops = 12 * layers * hidden * s_eff / 2
    fpt = 6 * n_params + attn_flops
    peak = args.peak_tflops * 1e12
    row: dict[str, Any] = {
        "shape": shape, "mode": mode, "layout": layout, "status": "ok",
        "attention": attn,
        "params": n_params, "layers": layers, "hidden": hidden,
        "zero_stage": None if mode == "plain" else cfg.train.zero_stage,
        "adamw": adamw_kind(optimizer if engine is None
                            else getattr(engine, "client_optimizer", None)),
        "loss": "HF full logits" if mode == "plain"
                else f"build_engine's LossModule -> token_loss_sum "
                     f"(chunk {cfg.train.loss_chunk_size})",
        "micro_batch": tc.micro_batch_size, "seq_len": tc.seq_len,
        "warmup_steps": args.warmup, "timed_steps": len(steps), "seconds": secs,
        "tokens_per_s": real_rate, "slot_tokens_per_s": slot_rate,
        "supervised_tokens_per_s": sum(s["supervised"] for s in steps) / secs,
        "seq_len_token_weighted": s_eff,
        "mean_seq_len": sum(timed_lens) / len(timed_lens),
        "attn_flops_per_token": attn_flops, "flops_per_token": fpt,
        "mfu": real_rate * fpt / peak,
        "adapter_params": n_adapters,
        "mfu_lora": (real_rate * (4 * (n_params - n_adapters) + 6 * n_adapters + attn_flops)
                     / peak if n_adapters else None),
        "mfu_notes": slot_rate * (6 * n_params + 12 * layers * hidden * tc.seq_len) / peak,
        "step_s_median": statistics.median(s["seconds"] for s in steps),
        "step_s": [round(s["seconds"], 4) for s in steps],
        "losses": [round(s["loss"], 4) for s in steps],
        "init_s": init_s, "data": data_stats,
    }
    row.update(memory_stats(cuda))
    return row


def memory_stats(cuda: bool) -> dict[str, float | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    if not cuda:
        return {"peak_mem_alloc_gib": None, "peak_mem_reserved_gib": None, "peak_rss_gib": rss}
    return {"peak_mem_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "peak_rss_gib": rss}


def child_main(args: argparse.Namespace) -> int:
    shape, mode, result = args.child
    try:
        row = run_child(args, shape, mode)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the row's status
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row = {"shape": shape, "mode": mode, "layout": args.layout,
               "status": "oom" if oom else "error",
               "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
               "traceback": traceback.format_exc()[-4000:]}
        row.update(memory_stats(not args.smoke and torch.cuda.is_available()))
        traceback.print_exc()
    Path(result).write_text(json.dumps(row))
    return 0


# ------------------------------------------------------------------------------ driver


def machine_info(smoke: bool) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "transformers": transformers.__version__,
                            "cores": len(os.sched_getaffinity(0))}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    if not smoke and torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(gpu=prop.name, gpu_memory_gib=prop.total_memory / GIB,
                    sms=prop.multi_processor_count)
    else:
        info["gpu"] = None
    return info


def child_command(args: argparse.Namespace, shape: str, mode: str, result: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", shape, mode, str(result),
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--peak-tflops", str(args.peak_tflops), "--long-seq", str(args.long_seq),
           "--layout", args.layout, "--median-len", str(args.median_len),
           "--seed", str(args.seed)]
    if args.deepspeed:
        cmd += ["--deepspeed", args.deepspeed]
    if args.profile:
        cmd.append("--profile")
    if args.loss_chunk_size is not None:
        cmd += ["--loss-chunk-size", str(args.loss_chunk_size)]
    if args.smoke:
        cmd.append("--smoke")
    return cmd


def driver_main(args: argparse.Namespace) -> int:
    shapes = args.shapes.split(",")
    modes = args.modes.split(",")
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    machine = machine_info(args.smoke)
    print(f"{machine.get('gpu') or 'CPU (smoke)'}; torch {machine['torch']}, transformers "
          f"{machine['transformers']}, deepspeed {machine['deepspeed']}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="palign-mfu-"))
    plan = [(shape, mode) for shape in shapes for mode in modes]
    plan += [(shape, "palign-long") for shape in filter(None, args.long_shapes.split(","))
             if (shape, "palign-long") not in plan]
    for shape, mode in plan:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < 20:
            rows.append({"shape": shape, "mode": mode, "layout": args.layout,
                         "status": "skipped", "error": "--deadline-s reached"})
            continue
        result = work / f"{shape}-{mode}.json"
        print(f"== {shape} {mode} ({args.layout})", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(child_command(args, shape, mode, result),
                                  timeout=min(args.child_timeout_s, left))
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if result.is_file():
            row = json.loads(result.read_text())
        else:
            row = {"shape": shape, "mode": mode, "layout": args.layout,
                   "status": "timeout" if rc == "timeout" else "error",
                   "error": f"child ended ({rc}) without a result"}
        row["child_wall_s"] = time.perf_counter() - t0
        rows.append(row)
    report = {
        "benchmark": "train_mfu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine, "smoke": args.smoke, "formula": FORMULA,
        "peak_tflops": args.peak_tflops,
        "settings": {"seq_len": args.seq_len, "micro_batch": args.micro_batch,
                     "warmup": args.warmup, "steps": args.steps, "layout": args.layout,
                     "median_len": args.median_len, "long_seq": args.long_seq,
                     "loss_chunk_size": args.loss_chunk_size, "seed": args.seed,
                     "deepspeed": args.deepspeed},
        "rows": rows, "goals": goals(rows),
        "wall_s": time.perf_counter() - start,
    }
    print_table(report)
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in rows) else 1


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """palign's real tokens/s over plain's per shape (goal >= 1, stretch 1.15); the long row."""
    ok = {(r["shape"], r["mode"]): r for r in rows if r["status"] == "ok"}
    out: dict[str, Any] = {}
    for shape in sorted({s for s, _ in ok}):
        p, b = ok.get((shape, "palign")), ok.get((shape, "plain"))
        if p and b:
            ratio = p["tokens_per_s"] / b["tokens_per_s"]
            out[f"{shape}_palign_over_plain_tokens_per_s"] = ratio
            out[f"{shape}_goal_met"] = ratio >= 1.0
    for r in rows:
        if r["mode"] == "palign-lora-long":
            out[f"{r['shape']}_lora_long_row_fits"] = r["status"] == "ok"
            if r["status"] == "ok":
                out[f"{r['shape']}_lora_long_row_peak_alloc_gib"] = r.get("peak_mem_alloc_gib")
        if r["mode"] == "palign-lora" and r["status"] == "ok":
            out[f"{r['shape']}_lora_tokens_per_s"] = r["tokens_per_s"]
            out[f"{r['shape']}_lora_goal_10k_met"] = r["tokens_per_s"] >= 10_000
        if r["mode"] == "palign-long":
            out[f"{r['shape']}_long_row_fits"] = r["status"] == "ok"
            if r["status"] == "ok":
                out[f"{r['shape']}_long_row_tokens_per_s"] = r["tokens_per_s"]
                out[f"{r['shape']}_long_row_peak_alloc_gib"] = r.get("peak_mem_alloc_gib")
    return out


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = "train_lora" if args.lora else "train_mfu"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"{name}.json"
    if args.smoke:
        return Path(tempfile.gettempdir()) / f"{name}_smoke.json"
    return ROOT / "benchmarks" / "results" / f"{name}_gpu.json"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['formula']}; peak {report['peak_tflops']:g} TFLOP/s")
    head = (f"{'shape':5s} {'mode':12s} {'status':7s} {'tok/s':>9s} {'MFU':>6s} "
            f"{'MFU(notes)':>10s} {'step s':>7s} {'S':>6s} {'alloc GiB':>9s} {'resv GiB':>8s}")
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        print(f"{r['shape']:5s} {r['mode']:12s} {r['status']:7s} "
              f"{_fmt(r.get('tokens_per_s'), '9.0f')} {_fmt(r.get('mfu'), '6.3f')} "
              f"{_fmt(r.get('mfu_notes'), '10.3f')} {_fmt(r.get('step_s_median'), '7.3f')} "
              f"{_fmt(r.get('seq_len_token_weighted'), '6.0f')} "
              f"{_fmt(r.get('peak_mem_alloc_gib'), '9.1f')} "
              f"{_fmt(r.get('peak_mem_reserved_gib'), '8.1f')}")
        if r.get("mfu_lora") is not None:
            print(f"      LoRA: {r['adapter_params']:,} adapter parameters; MFU counting only "
                  f"what LoRA computes (4 N_base + 6 N_adapters): {r['mfu_lora']:.3f}")
        if r.get("error"):
            print(f"      {r['error'][:300]}")
    for key, value in report["goals"].items():
        print(f"goal {key}: {value:.3f}" if isinstance(value, float) and not
              isinstance(value, bool) else f"goal {key}: {value}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma list of 0.5b, 1.5b (smoke: tiny)")
    ap.add_argument("--modes", default=None,
                    help=f"comma list of {', '.join(MODES)} (default palign,plain; smoke: all)")
    ap.add_argument("--seq-len", type=int, default=None, help="4096 (smoke 512)")
    ap.add_argument("--micro-batch", type=int, default=None, help="4 (smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="3 (smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="15 (smoke 2)")
    ap.add_argument("--layout", choices=("packed", "full"), default="packed")
    ap.add_argument("--median-len", type=int, default=900, help="median sequence length")
    ap.add_argument("--loss-chunk-size", type=int, default=1024)
    ap.add_argument("--long-seq", type=int, default=None,
                    help="palign-long's one sequence (32768; smoke 2048)")
    ap.add_argument("--long-shapes", default=None,
                    help="shapes that also get a palign-long row after the others (1.5b; "
                         "smoke: none, its modes include it)")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--deadline-s", type=float, default=480.0,
                    help="start no new row after this many seconds")
    ap.add_argument("--child-timeout-s", type=float, default=240.0)
    ap.add_argument("--profile", action="store_true",
                    help="one extra untimed step per row under torch.profiler (tables to stdout)")
    ap.add_argument("--deepspeed", default=None,
                    help="JSON for train.deepspeed: merged over palign's DeepSpeed config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU check (fp32, gloo)")
    ap.add_argument("--lora", action="store_true",
                    help="the paper's one-GPU LoRA recipe instead: the 7B shape, modes "
                         "palign-lora (4 x 4096 packed) and palign-lora-long (1 x 32768)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or results/)")
    ap.add_argument("--child", nargs=3, metavar=("SHAPE", "MODE", "RESULT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    big = {"shapes": "0.5b,1.5b", "modes": "palign,plain", "seq_len": 4096, "micro_batch": 4,
           "warmup": 3, "steps": 15, "long_seq": 32768, "long_shapes": "1.5b"}
    small = {"shapes": "tiny", "modes": ",".join(MODES), "seq_len": 512, "micro_batch": 2,
             "warmup": 1, "steps": 2, "long_seq": 2048, "long_shapes": ""}
    if args.lora:  # the 7B shape: model set-up is most of a row's time, so fewer steps
        big = {**big, "shapes": "7b", "modes": ",".join(LORA_MODES), "warmup": 2, "steps": 5,
               "long_shapes": ""}
        small = {**small, "modes": ",".join(LORA_MODES)}
    for key, value in (small if args.smoke else big).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke and args.median_len == 900:
        args.median_len = 120
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.child else driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
