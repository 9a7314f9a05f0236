"""A step measured in rows (``train.rows_per_step``) and LoRA with the loop's other parts, under
torchrun without Ray (2 gloo processes or 1), on a tiny random-init Llama:

- 70 rows, 32 rows per step, 2 processes: every step trains on 32 rows, the epoch's last on
  the 6 left, whatever their lengths, and the log says so;
- the loss is the mean over the step's target tokens: packed bins and one padded row at a time
  give the same losses and gradient norms;
- LoRA with sequence parallelism, gradient checkpointing and the fused optimizer: each row
  split over 2 processes trains as whole rows on 1.

About 1.5 minutes on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic_rows import addition_rows
from test_train import assert_same_steps, torchrun_steps

from palign.config import Config, parse_config
from palign.data.shards import ShardWriter

pytestmark = pytest.mark.model

N_ROWS = 70


def rows() -> list[dict]:
    """Align-stage rows of unequal lengths (1 to 29 steps of working)."""
    return addition_rows(N_ROWS, seed=1, max_steps=30)


def config(tmp: Path, model: str, **train) -> Config:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "out"
    ShardWriter(out / "align", "jsonl", 16).write(rows())
    return parse_config({
        "run": {"name": "rows", "output_dir": str(out), "stages": ["train"]},
        "data": {"path": str(tmp / "unused.jsonl")},
        "models": {"student": model},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 512, "lr": 2e-3,
                  "warmup_ratio": 0.1, "loss_chunk_size": 128, "checkpoint_every": 100,
                  "report_every": 1, **train},
    })


def summary(cfg: Config) -> dict:
    return json.loads((Path(cfg.run.output_dir) / "train" / "summary.json").read_text())


def test_each_step_takes_its_rows_whatever_their_lengths(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model, num_workers=2, rows_per_step=32, epochs=2)
    steps = torchrun_steps(cfg, 2)
    assert [s for s, _, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert summary(cfg)["rows_per_step"] == [32, 32, 6, 32, 32, 6]
    log = (Path(cfg.run.output_dir).parent / "torchrun.log").read_text()
    assert log.count("the epoch's last step") == 2


def test_packed_and_padded_rows_give_the_same_losses(tiny_model, tmp_path):
    packed = torchrun_steps(config(tmp_path / "packed", tiny_model, rows_per_step=16,
                                   max_steps=4), 1)
    padded = torchrun_steps(config(tmp_path / "padded", tiny_model, rows_per_step=16,
                                   max_steps=4, packing=False, micro_batch_size=4), 1)
    assert len(packed) == 4
    assert_same_steps(padded, packed)


def test_lora_rows_split_over_two_processes_train_as_whole_rows(tiny_model, tmp_path):
    # no dropout: the processes of a split row would draw other masks than one process
    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "gradient_checkpointing": True,
            "fused_optimizer": True, "max_steps": 4}
    whole = torchrun_steps(config(tmp_path / "whole", tiny_model, **lora), 1)
    split = torchrun_steps(config(tmp_path / "split", tiny_model, num_workers=2,
                                  sequence_parallel_size=2, **lora), 2)
    assert len(whole) == 4
    assert_same_steps(split, whole)
