"""The train stage end to end on a real local Ray cluster (2 CPU workers, DeepSpeed ZeRO-2 and
ZeRO-3, a tiny random-init Llama with the SmolLM2 tokenizer): the loss goes down, the exported
folder loads and generates, rejects are written once; a run that fails after its last
checkpoint resumes with the losses of an uninterrupted run, both when rerun with the same name
and storage, on another number of workers (elastic, through DeepSpeed's universal checkpoints),
and when Ray retries the worker group (``max_failures``); and the same
loop under torchrun without Ray, in one process accumulating two micro-batches, gives the losses
of the two Ray workers and resumes from its checkpoints on disk.
About 5-6 minutes on 2 cores."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic_rows import addition_rows
from tb_events import scalars
from train_faults import fail_after
from transformers import AutoModelForCausalLM, AutoTokenizer

from palign.config import Config, parse_config
from palign.data.fingerprint import FILE as FINGERPRINT
from palign.data.shards import REJECTS, ShardWriter, read_rows
from palign.train.checkpoints import check_global_batch
from palign.train.engine import lr_lambda
from palign.train.prepare import prepare
from palign.train.steps import StepPlan
from palign.train.trainer import run_train
from palign.train.units import UnitReader

pytestmark = pytest.mark.model  # and ray, for the tests on the ray_cluster fixture

N_ROWS = 24
STEPS = 30
RESUME_ATOL = 1e-5  # fp32 on CPU, same world size and threads: measured difference 0.0
ZERO3_ATOL = 1e-4  # ZeRO-3 vs ZeRO-2 losses over 30 steps (other reduction order): measured 1e-6
ACCUM_ATOL = 1e-5  # 1 process x grad_accum 2 vs 2 workers, 30 steps: measured 7e-7
SP_RTOL = 1e-4  # rows split over 2 processes vs whole, losses and grad norms, relative
ROOT = Path(__file__).resolve().parents[2]
LONG_ID = "row-overlong"


def align_rows() -> list[dict]:
    """Synthetic align-stage rows: short arithmetic with a draft and a continuation."""
    return addition_rows(N_ROWS, seed=0, max_steps=9) + [
        {"id": LONG_ID, "question": "Sum these.", "answer": "0",
         "target": " ".join(["one plus one is two."] * 200)}]


def make_config(tmp: Path, model: str, name: str, **train) -> Config:
    out = tmp / "out"
    ShardWriter(out / "align", "jsonl", 10).write(align_rows())
    return parse_config({
        "run": {"name": name, "output_dir": str(out), "stages": ["train"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(tmp / "unused.jsonl")},
        "models": {"student": model},
        "train": {
            "num_workers": 2, "cpus_per_worker": 1, "seq_len": 256, "micro_batch_size": 1,
            "grad_accum": 1, "epochs": 5, "max_steps": STEPS, "lr": 2e-3, "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1, "loss_chunk_size": 128, "checkpoint_every": 100,
            "report_every": 5, **train,
        },
    })


def assert_learns_and_exports(cfg: Config, result) -> None:
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert result.rows_used == N_ROWS and result.rows_rejected == 1
    assert 0.5 < result.packing_efficiency <= 1.0
    assert result.tokens_per_s > 0 and result.checkpoint_dir
    rejects = list(read_rows(Path(cfg.run.output_dir) / "train" / REJECTS))
    assert [r["id"] for r in rejects] == [LONG_ID] and "max_len" in rejects[0]["reason"]
    model_dir = Path(result.model_dir)
    assert model_dir == Path(cfg.run.output_dir).absolute() / "train" / "model"
    assert (model_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_step_plan_is_a_partition_per_epoch():
    plan = StepPlan(n_units=13, world=2, micro=2, accum=2, epochs=2, max_steps=None, seed=3)
    assert plan.per_step == 8 and plan.steps_per_epoch == 2 and plan.total_steps == 4
    for epoch in range(2):
        seen = [u for s in range(2) for r in range(2)
                for mb in plan.micro_batches(epoch * 2 + s, r) for u in mb]
        assert len(seen) == 16 and set(seen) == set(range(13))  # 3 repeated to fill the step
    assert plan.micro_batches(0, 0) != plan.micro_batches(2, 0)  # another epoch, another order
    assert plan.micro_batches(2, 1) == plan.micro_batches(2, 1)
    f = lr_lambda(10, 0.2, 0.1)
    assert [round(f(i), 6) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert math.isclose(f(9), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tiny_model, tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("z2"), tiny_model, "z2",
                      report_to=["tensorboard", "mlflow"])  # rank 0 logs every step there
    return cfg, run_train(cfg)


def test_zero2_learns_and_exports(zero2_run):
    cfg, result = zero2_run
    assert_learns_and_exports(cfg, result)


def test_tensorboard_and_mlflow_hold_every_steps_loss(zero2_run, monkeypatch):
    """report_to: [tensorboard, mlflow]: the event file and MLflow's local store hold the loss
    of every step (30, reported every 5) as the run's summary has it, and the export's path."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as rank 0 did to write it
    cfg, result = zero2_run
    train = Path(cfg.run.output_dir).absolute() / "train"
    tb = scalars(train / "tensorboard")["loss"]
    assert sorted(tb) == list(range(1, STEPS + 1))
    assert [tb[s] for s in sorted(tb)] == pytest.approx(result.losses, rel=1e-6)  # float32
    state = json.loads((train / "tracking.json").read_text())["mlflow"]
    assert state["tracking_uri"] == (train / "mlruns").as_uri()
    client = MlflowClient(state["tracking_uri"])
    history = client.get_metric_history(state["run_id"], "loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(result.losses, 1))
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["export_dir"] == result.model_dir
    assert run.data.params["trainable_params"] == str(result.trainable_params)
    assert run.data.params["train.zero_stage"] == "2"


def test_zero3_learns_and_exports(zero2_run, tiny_model, tmp_path):
    # Small loss chunks: 8 LM-head calls (ZeRO-3 weight gathers) per micro-batch of 256
    # positions, while the two ranks' micro-batches hold different supervised counts, so a
    # chunk count that followed the labels would differ between the ranks and deadlock.
    cfg = make_config(tmp_path, tiny_model, "z3", zero_stage=3, loss_chunk_size=32)
    data = UnitReader(prepare(cfg, use_ray=False).folder)
    plan = StepPlan(len(data), 2, 1, 1, 5, STEPS, cfg.train.seed)
    def supervised(unit: int) -> int:
        return sum(1 for label in data.unit(unit).labels[1:] if label != -100)

    by_labels = [[math.ceil(sum(supervised(i) for i in plan.micro_batches(s, r)[0]) / 32)
                  for r in range(2)] for s in range(STEPS)]
    assert sum(a != b for a, b in by_labels) >= STEPS // 3, by_labels
    result = run_train(cfg)
    assert_learns_and_exports(cfg, result)
    # Same data, same start: ZeRO-3 computes what ZeRO-2 does, up to reduction order.
    ref = zero2_run[1].losses
    assert max(abs(a - b) for a, b in zip(result.losses, ref)) < ZERO3_ATOL


def with_train(cfg: Config, **train) -> Config:
    raw = cfg.model_dump(mode="json")
    raw["train"].update(train)
    return parse_config(raw)


def test_failed_runs_resume_elastically_and_retried_with_the_same_losses(
        zero2_run, tiny_model, tmp_path):
    """2 workers fail after step 10 (checkpoints every 5 steps); the rerun on 1 worker
    (grad_accum 2: the same global batch) resumes after 10 through a universal checkpoint and
    fails after step 20; the rerun on 2 workers resumes after 20 the same way, fails after step
    27, and Ray retries its worker group (``max_failures``), which resumes after 25 and
    finishes. The loss curve is the uninterrupted 2-worker run's throughout."""
    # sync uploads: each injected failure comes right after a checkpoint, which must be there
    cfg = make_config(tmp_path, tiny_model, "elastic", checkpoint_every=5, keep_checkpoints=2,
                      checkpoint_upload="sync")
    with pytest.raises(Exception, match="injected failure"):
        run_train(with_train(cfg, callbacks=[fail_after(10)]))
    run_folder = Path(cfg.run.output_dir).absolute() / "train" / "ray" / "elastic-train"

    def written_by(step: int) -> int:
        path = run_folder / f"checkpoint_{step:08d}" / "train_state.json"
        return json.loads(path.read_text())["world_size"]

    assert written_by(10) == 2
    with pytest.raises(Exception, match="injected failure after step 20"):
        run_train(with_train(cfg, num_workers=1, grad_accum=2,
                             callbacks=[fail_after(20, resumed_from=10)]))
    assert written_by(20) == 1
    result = run_train(with_train(cfg, max_failures=1,  # 2 workers again
                                  callbacks=[fail_after(27, resumed_from=20)]))
    assert result.resumed_from == 25  # the retried worker group's start
    assert len(result.losses) == STEPS
    diffs = [abs(a - b) for a, b in zip(result.losses, zero2_run[1].losses)]
    assert max(diffs) <= ACCUM_ATOL, diffs
    rejects = list(read_rows(Path(cfg.run.output_dir) / "train" / REJECTS))
    assert [r["id"] for r in rejects] == [LONG_ID]  # written once, not again on resume


def test_resume_with_another_global_batch_fails_naming_the_field(tiny_model, tmp_path):
    cfg = make_config(tmp_path, tiny_model, "batch", num_workers=1, grad_accum=1)
    state = {"world_size": 2, "micro_batch_size": 1, "grad_accum": 1}
    with pytest.raises(ValueError, match="train.grad_accum: .* global batch of 2 .* this run "
                                         "has 1"):
        check_global_batch(state, cfg.train, 1)
    check_global_batch(state, with_train(cfg, grad_accum=2).train, 1)  # 1 x 1 x 2: fine
    # 2 workers splitting each row: 1 data-parallel group, a global batch of 1
    split = {"world_size": 2, "sequence_parallel_size": 2, "micro_batch_size": 1, "grad_accum": 1}
    check_global_batch(split, cfg.train, 1)
    with pytest.raises(ValueError, match="global batch of 1 .* this run has 2"):
        check_global_batch(split, with_train(cfg, num_workers=2).train, 2)
    check_global_batch(split, with_train(cfg, num_workers=4, sequence_parallel_size=4).train, 4)
    with pytest.raises(ValueError, match="train.deepspeed.zero_optimization.reduce_scatter"):
        with_train(cfg, num_workers=2, sequence_parallel_size=2, zero_stage=3,
                   deepspeed={"zero_optimization": {"reduce_scatter": False}})


def test_torchrun_one_process_accumulating_matches_two_workers(zero2_run, tiny_model, tmp_path):
    """No Ray: one process with grad_accum=2 sees each step's two units as the two Ray workers
    did; with the loss normalised by the step's global token count both give the same updates.
    Also resumes from its own checkpoints on disk, keeping one."""
    cfg = make_config(tmp_path, tiny_model, "torchrun", num_workers=1, grad_accum=2,
                      checkpoint_every=10, keep_checkpoints=1)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    config_file, failing = tmp_path / "config.yaml", tmp_path / "failing.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    failing.write_text(yaml.safe_dump(
        with_train(cfg, callbacks=[fail_after(15)]).model_dump(mode="json")))

    def cmd(config: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "1", "-m", "palign.train.loop", str(config)]

    env = {**os.environ, "PYTHONPATH": pythonpath}
    first = subprocess.run(cmd(failing), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode != 0 and "injected failure" in first.stderr + first.stdout
    run_folder = Path(cfg.run.output_dir) / "train" / "ray" / "torchrun-train"
    assert [p.name for p in run_folder.iterdir()] == ["checkpoint_00000010"]
    second = subprocess.run(cmd(config_file), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    assert [p.name for p in run_folder.iterdir()] == ["checkpoint_00000030"]  # keep 1
    summary = json.loads((Path(cfg.run.output_dir) / "train" / "summary.json").read_text())
    diffs = [abs(a - b) for a, b in zip(summary["losses"], zero2_run[1].losses)]
    assert len(diffs) == STEPS and max(diffs) <= ACCUM_ATOL, diffs
    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]) is not None


def torchrun_steps(cfg: Config, procs: int, fail_at: int | None = None
                   ) -> list[tuple[int, float, float]]:
    """A torchrun run of ``cfg`` in ``procs`` processes (no Ray), in its output folder's parent:
    (step, loss, grad norm) of each step it logged (the whole log is left in
    ``torchrun.log`` there); with ``fail_at``, failing after that step (a train callback in
    the YAML it runs)."""
    import re

    folder = Path(cfg.run.output_dir).parent
    config_file = folder / "config.yaml"
    if fail_at is not None:
        cfg = with_train(cfg, callbacks=[fail_after(fail_at)])
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(procs), "-m", "palign.train.loop", str(config_file)],
        env=env, cwd=folder, capture_output=True, text=True, timeout=600)
    log = run.stderr + run.stdout
    (folder / "torchrun.log").write_text(log)
    if fail_at is None:
        assert run.returncode == 0, log[-3000:]
    else:
        assert run.returncode != 0 and "injected failure" in log, log[-3000:]
    steps = re.findall(r"train step (\d+)/\d+: loss ([\d.]+), lr [^,]+, grad norm ([\d.e+-]+)",
                       log)
    return [(int(s), float(a), float(b)) for s, a, b in steps]


def assert_same_steps(got: list[tuple[int, float, float]],
                      want: list[tuple[int, float, float]]) -> None:
    """Same steps, and losses and grad norms equal within ``SP_RTOL``."""
    assert [s for s, _, _ in got] == [s for s, _, _ in want], (got, want)
    for (_, *a), (_, *b) in zip(got, want):
        for x, y in zip(a, b):
            assert abs(x - y) <= SP_RTOL * abs(y), (got, want)


def test_sequence_parallel_rows_split_over_two_workers_train_as_on_one(tiny_model, tmp_path):
    """Ulysses sequence parallelism on gloo: each packed row split over 2 processes (one
    data-parallel group) gives the losses and gradient norms of 1 process holding whole rows,
    under ZeRO-2 and ZeRO-3 (whose reduce-scatter divides the gradients by both processes:
    the loss is scaled for it). And it resumes elastically both ways through a universal
    checkpoint: the ZeRO-3 split run, failed after step 3, on 1 process; the whole run's step-3
    checkpoint on 2 processes splitting the rows; both continue the whole run's curve."""
    def config(name: str, **train) -> Config:
        (tmp_path / name).mkdir()
        return make_config(tmp_path / name, tiny_model, "sp", max_steps=6, report_every=1,
                           checkpoint_every=3, checkpoint_upload="sync", **train)

    whole_cfg = config("whole", num_workers=1)
    whole = torchrun_steps(whole_cfg, 1)
    assert [s for s, _, _ in whole] == [1, 2, 3, 4, 5, 6]
    assert_same_steps(torchrun_steps(config("split", num_workers=2, sequence_parallel_size=2), 2),
                      whole)

    z3 = config("z3", num_workers=2, sequence_parallel_size=2, zero_stage=3, loss_chunk_size=32)
    assert_same_steps(torchrun_steps(z3, 2, fail_at=3), whole[:3])
    assert_same_steps(torchrun_steps(with_train(z3, num_workers=1, sequence_parallel_size=1), 1),
                      whole[3:])

    back = config("back", num_workers=2, sequence_parallel_size=2)
    ours, theirs = Path(back.run.output_dir), Path(whole_cfg.run.output_dir)
    shutil.rmtree(ours)
    shutil.copytree(theirs / "train" / "ray" / "sp-train" / "checkpoint_00000003",
                    ours / "train" / "ray" / "sp-train" / "checkpoint_00000003")
    shutil.copytree(theirs / "align", ours / "align")
    # with the fingerprint it was made under (a checkpoint without one is refused)
    shutil.copy(theirs / "train" / FINGERPRINT, ours / "train" / FINGERPRINT)
    assert_same_steps(torchrun_steps(back, 2), whole[3:])
