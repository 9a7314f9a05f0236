"""The DeepSpeed engine as configured, in gloo processes without Ray: ZeRO-3 builds the student
already partitioned (``deepspeed.zero.Init`` through transformers' ``HfDeepSpeedConfig``: two
processes each hold half of every parameter after ``palign.train.model.load_student``), and
optimizer (and ZeRO-3 parameter) offload trains exactly as without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ports import free_port

from palign.config import parse_config

pytestmark = pytest.mark.model


def _rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    import torch

    from palign.train.backend import start
    from palign.train.model import load_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = parse_config({"data": {"path": "x.jsonl"}, "models": {"student": model},
                        "train": {"num_workers": world, "zero_stage": 3}})
    backend = start(cfg.train)
    _, student = load_student(cfg, torch.float32, backend.device, backend.world)
    params = list(student.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "partitioned": all(hasattr(p, "ds_numel") for p in params),
        "full": sum(p.ds_numel for p in params),
        "held": sum(p.ds_tensor.numel() for p in params),
        "visible": sum(p.numel() for p in params),  # the placeholders: empty
    }))


def test_zero3_student_is_built_partitioned(tiny_model, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    mp.spawn(_rank, args=(2, free_port(), tiny_model, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["partitioned"] and r["full"] == whole and r["visible"] == 0
        assert r["held"] <= whole / 2 + 64 * len(ranks)  # its half (each tensor padded evenly)
    assert sum(r["held"] for r in ranks) >= whole


def _offload_losses(rank: int, port: int, model: str, out: str) -> None:
    import torch

    from palign.train.backend import start
    from palign.train.data import IGNORE_INDEX
    from palign.train.engine import deepspeed_engine
    from palign.train.loop import MicroBatch, train_step
    from palign.train.model import load_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    losses = {}
    for name, train in {"zero2": {}, "zero2-offload": {"offload_optimizer": True},
                        "zero3-offload": {"zero_stage": 3, "offload_optimizer": True,
                                          "offload_params": True}}.items():
        cfg = parse_config({"data": {"path": "x.jsonl"}, "models": {"student": model},
                            "train": {"num_workers": 1, "seq_len": 64, "lr": 1e-3,
                                      "max_steps": 3, **train}})
        backend = start(cfg.train)
        torch.manual_seed(0)
        _, student = load_student(cfg, torch.float32, backend.device)
        engine = deepspeed_engine(cfg, student, 1, 3)
        losses[name] = []
        for step in range(3):
            ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(step))
            labels = ids.clone()
            labels[:, :16] = IGNORE_INDEX
            micro = MicroBatch({"input_ids": ids, "labels": labels}, 48, 64)
            losses[name].append(train_step(engine, [micro], 1, backend.device).loss)
        if name == "zero2-offload":
            assert engine.zero_cpu_offload()
    Path(out, "losses.json").write_text(json.dumps(losses))


def test_optimizer_and_parameter_offload_train_as_without(tiny_model, tmp_path):
    import torch.multiprocessing as mp

    with pytest.raises(Exception, match="train.offload_params needs zero_stage: 3"):
        parse_config({"data": {"path": "x.jsonl"}, "models": {"student": "m"},
                      "train": {"offload_params": True}})
    mp.spawn(_offload_losses, args=(free_port(), tiny_model, str(tmp_path)), nprocs=1)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["zero2-offload"] == pytest.approx(losses["zero2"], rel=1e-6)
    assert losses["zero3-offload"] == pytest.approx(losses["zero2"], rel=1e-5)
