"""The train stage's fingerprint (``palign.train.identity``): a rerun refuses, before Ray starts
and writing nothing, to resume a checkpoint made under another learning rate or another
student (exit 2 through ``palign train``, each changed field named with its old and new value),
and lets one that changes only operational fields through. Which fields count: the global
batch, not its factors (an elastic resume stays possible).

The checkpoint is a real one, by the cheapest path: a 1-step torchrun run (one process, no Ray)
of the tiny random-init Llama, which also records the fingerprint (rank 0). The resume itself,
elastic and after a failure, is tests/integration/test_train.py's: its reruns go through the
same check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic_rows import addition_rows
from train_faults import fail_after

from palign.cli import main
from palign.config import Config, parse_config
from palign.data.fingerprint import FILE, ConfigChanged
from palign.data.shards import ShardWriter
from palign.train.identity import GLOBAL_BATCH, check_resume, train_fingerprint

pytestmark = pytest.mark.model  # a DeepSpeed run of a tiny model (no Ray)

LR = 2e-3
ROOT = Path(__file__).resolve().parents[2]


def make_config(tmp: Path, student: str, **train) -> Config:
    out = tmp / "out"
    if not (out / "align").exists():
        ShardWriter(out / "align", "jsonl", 4).write(addition_rows(6, seed=0, max_steps=4))
    return parse_config({
        "run": {"name": "fp", "output_dir": str(out), "stages": ["train"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(tmp / "unused.jsonl")},
        "models": {"student": student},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "seq_len": 256, "max_steps": 2,
                  "lr": LR, "loss_chunk_size": 128, "checkpoint_every": 1,
                  "checkpoint_upload": "sync", **train},
    })


def changed(cfg: Config, section: str, **fields) -> Config:
    raw = cfg.model_dump(mode="json")
    raw[section].update(fields)
    return parse_config(raw)


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_the_global_batch_counts_not_its_factors(tiny_model, tmp_path):
    cfg = make_config(tmp_path, tiny_model, num_workers=2)
    fp = train_fingerprint(cfg)
    same = [  # an elastic resume (same global batch), and fields that change no weight
        changed(cfg, "train", num_workers=1, grad_accum=2),
        changed(cfg, "train", num_workers=4, sequence_parallel_size=2),
        changed(cfg, "train", report_every=7, checkpoint_every=9, keep_checkpoints=5,
                max_failures=3, checkpoint_upload="async", loss_chunk_size=None,
                attention="dense", fused_optimizer=False, gradient_checkpointing=True,
                cpus_per_worker=2, storage_path=str(tmp_path / "elsewhere"),
                max_reject_share=0.9, offload_optimizer=True, dtype="float32",
                callbacks=[fail_after(1)]),
        changed(cfg, "ray", progress_bars=True),
    ]
    assert all(train_fingerprint(c) == fp for c in same)
    for other, field in [(changed(cfg, "train", num_workers=1), GLOBAL_BATCH),
                         (changed(cfg, "train", lr=1e-3), "lr"),
                         (changed(cfg, "train", seed=1), "seed"),
                         (changed(cfg, "train", lora={}), "lora"),
                         (changed(cfg, "train", max_steps=3), "max_steps"),
                         (changed(cfg, "train", use_gpu=True), "dtype")]:
        new = train_fingerprint(other)
        assert new != fp and new["train"][field] != fp["train"][field], field


@pytest.fixture(scope="module")
def checkpointed(tiny_model, tmp_path_factory):
    """A finished 1-step run of its own student folder, by the cheapest path to a real
    checkpoint: torchrun, one process, no Ray."""
    tmp = tmp_path_factory.mktemp("fp")
    student = tmp / "student"
    shutil.copytree(tiny_model, student)
    cfg = make_config(tmp, str(student), max_steps=1)
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "palign.train.loop", str(config_file)],
        env={**os.environ, "PYTHONPATH": pythonpath}, cwd=tmp, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    run_folder = Path(cfg.run.output_dir) / "train" / "ray" / "fp-train"
    assert (run_folder / "checkpoint_00000001" / "train_state.json").is_file()
    return cfg


def palign_train(cfg: Config, folder: Path, capsys) -> tuple[int, str]:
    config_file = folder / "rerun.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    code = main(["train", str(config_file)])
    return code, capsys.readouterr().err


def test_a_changed_lr_or_student_is_refused_before_any_work(
        checkpointed, tiny_model, tmp_path, capsys):
    cfg = checkpointed
    out = Path(cfg.run.output_dir)
    recorded = json.loads((out / "train" / FILE).read_text())
    assert recorded["train"]["lr"] == LR and recorded["student"]["files"]
    before = files_under(out)

    code, err = palign_train(changed(cfg, "train", lr=1e-3), tmp_path, capsys)
    assert code == 2, err
    assert "train.lr: 0.002 -> 0.001" in err and "--restart train" in err
    assert "checkpoint_00000001" in err

    code, err = palign_train(changed(cfg, "models", student=tiny_model), tmp_path, capsys)
    assert code == 2, err
    assert f"student.name: '{cfg.models.student}' -> '{tiny_model}'" in err

    student = Path(cfg.models.student)  # the same name, other files: another model
    config_json = student / "config.json"
    original = config_json.read_text()
    config_json.write_text(json.dumps({**json.loads(original), "note": "another model"}))
    try:
        with pytest.raises(ConfigChanged, match=r"student\.files: '[0-9a-f]+' -> '[0-9a-f]+'"):
            check_resume(cfg)
    finally:
        config_json.write_text(original)
    assert files_under(out) == before  # refused before any work: nothing written

    # Only operational fields changed: resumed (the resume itself, elastic too, is
    # tests/integration/test_train.py's, whose reruns now pass this check on their real
    # checkpoints).
    check_resume(changed(cfg, "train", num_workers=2, sequence_parallel_size=2,
                         report_every=2, keep_checkpoints=1, max_failures=1))
