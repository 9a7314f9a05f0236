"""train.report_to without Ray or a model: the trackers get a scripted sequence of steps, as the
loop gives them, and their own stores are read back (TensorBoard's event files, MLflow's file
store, W&B's offline run folder)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tb_events import scalars, texts

from palign.config import ConfigError, parse_config
from palign.train.trackers import (
    TRACKING_FILE,
    TensorBoard,
    Trackers,
    open_trackers,
    tracker_problems,
)

LOSSES = [2.5, 2.1, 1.7, 1.45, 1.3, 1.2]


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """palign opts into MLflow's file store in the process (``MLFLOW_ALLOW_FILE_STORE``):
    restored after each test (set then deleted, so that the teardown deletes it again)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "-")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def config(out: str | Path, *report_to: str, **tracking):
    return parse_config({
        "run": {"name": "tracked", "output_dir": str(out), "stages": ["train"]},
        "data": {"path": "x.jsonl"}, "models": {"student": "smollm2-135m"},
        "train": {"report_to": list(report_to), "tracking": tracking, "lr": 3e-4}})


def step_metrics(step: int, loss: float) -> dict:
    """What the loop hands over at a step: the step line's numbers and the run's constants."""
    return {"step": step, "total_steps": 6, "resumed_from": 0, "epoch": 0, "loss": loss,
            "lr": 1e-4 * step, "grad_norm": None if step == 1 else 0.5 / step,
            "tokens_per_s": 1000.0 + step, "rows": 4, "tokens": 300 + step,
            "packing_efficiency": 0.9, "trainable_params": 10, "total_params": 20}


def run_steps(trackers: Trackers, steps: range, losses: list[float]) -> None:
    for step in steps:
        trackers.log(step_metrics(step, losses[step - 1]), step)


def test_a_missing_package_or_an_unusable_store_is_named_at_validate(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path, "tensorboard", "mlflow", "wandb")
    absent = {"mlflow", "wandb"}
    problems = tracker_problems(cfg, lambda m: None if m in absent else object())
    assert problems == [
        "train.report_to: mlflow is not installed here: pip install 'palign[mlflow]'",
        "train.report_to: wandb is not installed here: pip install 'palign[wandb]'"]
    assert tracker_problems(config(tmp_path, "tensorboard")) == []  # tensorboardX is here
    # MLflow's file store is local: object storage needs a tracking server (or the env's URI)
    remote = config("s3://bucket/runs", "mlflow")
    [problem] = tracker_problems(remote, lambda m: object())
    assert problem.startswith("train.tracking.mlflow_tracking_uri: MLflow's file store needs "
                              "a local folder, and run.output_dir is s3://bucket/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracker_problems(remote, lambda m: object()) == []
    sqlite = config(tmp_path, "mlflow", mlflow_tracking_uri="sqlite:///mlflow.db")
    [problem] = tracker_problems(sqlite, lambda m: None if m == "sqlalchemy" else object())
    assert "train.tracking.mlflow_tracking_uri: sqlite:///mlflow.db" in problem
    with pytest.raises(ConfigError, match=r"train\.report_to: each tracker at most once"):
        config(tmp_path, "mlflow", "tensorboard", "mlflow")
    assert config(tmp_path).train.report_to == []  # none by default


def test_only_rank_0_reports(tmp_path):
    cfg = config(tmp_path, "tensorboard")
    trackers = open_trackers(cfg, rank=1, start_step=0)
    trackers.start({"trainable_params": 10})
    run_steps(trackers, range(1, 3), LOSSES)
    trackers.close()
    assert not trackers.on and not (tmp_path / "train").exists()


def mlflow_run(cfg):
    from mlflow.tracking import MlflowClient

    state = json.loads((Path(cfg.run.output_dir) / "train" / TRACKING_FILE).read_text())
    uri = state["mlflow"]["tracking_uri"]
    assert uri == (Path(cfg.run.output_dir) / "train" / "mlruns").absolute().as_uri()
    client = MlflowClient(uri)
    return client, client.get_run(state["mlflow"]["run_id"])


def test_tensorboard_and_mlflow_hold_every_step(tmp_path):
    cfg = config(tmp_path / "out", "tensorboard", "mlflow")
    trackers = open_trackers(cfg, rank=0, start_step=0)
    trackers.start({"trainable_params": 10, "total_params": 20, "resumed_from": 0})
    run_steps(trackers, range(1, 7), LOSSES)
    trackers.finish("/models/tracked")
    trackers.close()

    tb = scalars(tmp_path / "out" / "train" / "tensorboard")
    assert tb["loss"] == {s: pytest.approx(x, rel=1e-6) for s, x in enumerate(LOSSES, 1)}
    assert sorted(tb["grad_norm"]) == [2, 3, 4, 5, 6]  # none at step 1: not a number
    assert tb["tokens"][3] == 303 and tb["rows"][6] == 4 and tb["lr"][2] == pytest.approx(2e-4)
    assert set(tb) == {"loss", "lr", "grad_norm", "tokens_per_s", "rows", "tokens", "epoch",
                       "packing_efficiency"}
    text = texts(tmp_path / "out" / "train" / "tensorboard")
    assert text["export_dir/text_summary"] == ["/models/tracked"]
    assert "train.lr: 0.0003" in text["config/text_summary"][0]

    client, run = mlflow_run(cfg)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(LOSSES, 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_s")] == [
        1, 2, 3, 4, 5, 6]
    params = run.data.params
    assert params["train.lr"] == "0.0003" and params["trainable_params"] == "10"
    assert params["train.report_to"] == '["tensorboard", "mlflow"]'
    assert params["models.student"] == "smollm2-135m"
    assert run.data.tags["export_dir"] == "/models/tracked"
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"  # run.name


def test_a_resume_continues_the_same_runs(tmp_path):
    """Steps 1-5 logged, the run fails, the checkpoint of step 3 resumes it: TensorBoard shows
    the resumed run's steps 4 and 5, MLflow goes on in the same run."""
    cfg = config(tmp_path, "tensorboard", "mlflow", experiment="sft")
    first = open_trackers(cfg, rank=0, start_step=0)
    first.start({"trainable_params": 10, "resumed_from": 0})
    run_steps(first, range(1, 6), LOSSES)
    first.close()  # no finish: the run failed
    _, failed = mlflow_run(cfg)
    assert failed.info.status == "FAILED"

    again = [*LOSSES[:3], 1.44, 1.29, 1.21]
    second = open_trackers(cfg, rank=0, start_step=3)
    second.start({"trainable_params": 10, "resumed_from": 3})
    run_steps(second, range(4, 7), again)
    second.finish("/models/tracked")
    second.close()

    tb = scalars(tmp_path / "train" / "tensorboard")
    assert tb["loss"] == {s: pytest.approx(x, rel=1e-6) for s, x in enumerate(again, 1)}
    client, run = mlflow_run(cfg)
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(history)) == sorted(set(enumerate(LOSSES[:5], 1)) | {(4, 1.44), (5, 1.29),
                                                                          (6, 1.21)})
    assert run.data.params["resumed_from"] == "0"  # a parameter is written once...
    assert run.data.tags["changed.resumed_from"] == "3"  # ...what changed is noted
    assert client.get_experiment(run.info.experiment_id).name == "sft"


def test_tensorboard_on_object_storage_is_uploaded_at_the_end(s3, tmp_path):
    from s3_server import BUCKET

    from palign.data import storage

    out = f"s3://{BUCKET}/tracked-{tmp_path.name}"
    cfg = config(out, "tensorboard")
    trackers = open_trackers(cfg, rank=0, start_step=0)
    trackers.start({"trainable_params": 10})
    run_steps(trackers, range(1, 7), LOSSES)
    trackers.finish("/models/tracked")
    trackers.close()
    remote = storage.join(out, "train", "tensorboard")
    [name] = storage.list_files(remote)
    (tmp_path / name).write_bytes(storage.read_bytes(storage.join(remote, name)))
    assert sorted(scalars(tmp_path)["loss"]) == [1, 2, 3, 4, 5, 6]
    state = json.loads(storage.read_text(storage.join(out, "train", TRACKING_FILE)))
    assert state == {"tensorboard": {"dir": remote}}


class BrokenDashboard:
    """A tracker whose server goes away after step 2."""

    name = "broken"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def state(self) -> dict:
        return {}

    def start(self, params, counts) -> None:
        pass

    def log(self, metrics, step) -> None:
        if step > 2:
            raise ConnectionError("connection refused")
        self.steps.append(step)

    def finish(self, model_dir) -> None:
        raise AssertionError("switched off: never called again")

    def close(self, done) -> None:
        raise AssertionError("switched off: never called again")


def test_a_tracker_failing_mid_run_warns_once_and_is_switched_off(tmp_path, caplog):
    cfg = config(tmp_path, "tensorboard")
    broken = BrokenDashboard()
    trackers = Trackers(cfg, [broken, TensorBoard(cfg, 0)])
    trackers.start({"trainable_params": 10})
    with caplog.at_level(logging.WARNING, logger="palign.train.trackers"):
        run_steps(trackers, range(1, 7), LOSSES)
        trackers.finish("/models/tracked")
        trackers.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["train.report_to: broken failed at step 3 and is off for the rest of "
                      "this run: ConnectionError: connection refused"]
    assert broken.steps == [1, 2]
    assert sorted(scalars(tmp_path / "train" / "tensorboard")["loss"]) == [1, 2, 3, 4, 5, 6]


def test_a_tracker_failing_to_start_fails_the_run(tmp_path):
    cfg = config(tmp_path, "tensorboard")

    class Unreachable(BrokenDashboard):
        def start(self, params, counts) -> None:
            raise ConnectionError("connection refused")

    with pytest.raises(RuntimeError, match="train.report_to: broken failed to start: "
                                           "ConnectionError"):
        Trackers(cfg, [Unreachable()]).start({"trainable_params": 10})


def test_wandb_offline_holds_the_run_and_its_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'palign[wandb]')")
    from wandb_records import run_data

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, "wandb", wandb_project="palign-tests")
    trackers = open_trackers(cfg, rank=0, start_step=0)
    trackers.start({"trainable_params": 10, "total_params": 20})
    run_steps(trackers, range(1, 5), LOSSES)
    trackers.close()  # failed after step 4; resumed from step 3's checkpoint
    resumed = open_trackers(cfg, rank=0, start_step=3)
    resumed.start({"trainable_params": 10, "total_params": 20})
    run_steps(resumed, range(4, 7), LOSSES)
    resumed.finish("/models/tracked")
    resumed.close()
    state = json.loads((tmp_path / "train" / TRACKING_FILE).read_text())["wandb"]
    assert state["project"] == "palign-tests"
    # one W&B run (one id), written offline in two sittings (a folder each; within one second
    # W&B adds -1 to the second's name)
    first, second = sorted((tmp_path / "train" / "wandb").glob(
        f"offline-run-*-{state['id']}*/*.wandb"), key=lambda p: p.parent.name)
    run = run_data(first)
    assert [(row["step"], row["loss"]) for row in run["history"]] == list(
        enumerate(LOSSES[:4], 1))
    assert "grad_norm" not in run["history"][0] and run["history"][1]["grad_norm"] == 0.25
    assert run["config"]["train"]["lr"] == 3e-4 and run["config"]["trainable_params"] == 10
    run = run_data(second)
    assert [(row["step"], row["loss"]) for row in run["history"]] == list(
        enumerate(LOSSES, 1))[3:]
    assert run["summary"]["export_dir"] == "/models/tracked"
