"""Training logs for the dashboards people already watch (``train.report_to``): TensorBoard,
MLflow and Weights & Biases.

Only rank 0 reports, and it reports every step, whatever ``report_every`` says (that field
paces the step lines and Ray Train's reports): the numbers of the step line (loss, lr, grad
norm, tokens/s, the step's rows and tokens) plus epoch and packing efficiency. At the start a
tracker gets the config, flattened to dotted keys, as its run's parameters with the trainable
and total parameter counts; at the end, the export's path.

Each tracker's package is an optional extra (``TRACKERS``); ``tracker_problems`` names the
missing ones before any work (``palign validate``). MLflow is always given an explicit URI:
mlflow-skinny has no SQLAlchemy, so its default ``sqlite:`` store would not load.

A resumed run continues the same dashboard run: the MLflow run id and the W&B id are kept in
``<output_dir>/train/tracking.json``, and TensorBoard drops the events of the steps the resume
does again (``purge_step``). A tracker that fails to start fails the run (like a callback that
cannot be made); one that fails later logs one warning and is switched off: a days-long run is
not stopped for a dashboard. No Ray here: the loop runs under Ray Train and torchrun alike.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from palign.config import Config
from palign.data import fingerprint, storage

logger = logging.getLogger("palign.train.trackers")

# tracker: (the module it needs, what to install for it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "palign[tensorboard]"),
    "mlflow": ("mlflow", "palign[mlflow]"),
    "wandb": ("wandb", "palign[wandb]"),
}
STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "rows", "tokens", "epoch",
                "packing_efficiency")
TRACKING_FILE = "tracking.json"
PARAM_CHARS = 500  # MLflow's oldest servers refuse longer parameter values
BATCH = 100  # MLflow takes at most 100 parameters or tags per call
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores


def tracker_problems(cfg: Config,
                     find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
    """What keeps ``train.report_to`` from working here, one message per problem, each naming
    the field: a tracker whose package is missing, an MLflow store it cannot use."""
    tc = cfg.train
    problems = [f"train.report_to: {name} is not installed here: pip install "
                f"'{TRACKERS[name][1]}'"
                for name in tc.report_to if find_spec(TRACKERS[name][0]) is None]
    if "mlflow" in tc.report_to:
        uri = mlflow_uri(cfg)
        scheme = uri.split(":", 1)[0].split("+", 1)[0] if uri else ""
        if uri is None:
            problems.append(
                "train.tracking.mlflow_tracking_uri: MLflow's file store needs a local folder, "
                f"and run.output_dir is {cfg.run.output_dir}; set a tracking server URI")
        elif scheme in DB_SCHEMES and find_spec("sqlalchemy") is None:
            problems.append(
                f"train.tracking.mlflow_tracking_uri: {uri} is a database store, which needs "
                "the full mlflow package (SQLAlchemy); use a file: URI or a tracking server, "
                "or pip install mlflow")
    return problems


def train_dir(cfg: Config) -> str:
    return storage.absolute(cfg.stage_dir("train"))


def tensorboard_dir(cfg: Config) -> str:
    """``train.tracking.tensorboard_dir``, else ``<output_dir>/train/tensorboard``."""
    return cfg.train.tracking.tensorboard_dir or storage.join(train_dir(cfg), "tensorboard")


def mlflow_uri(cfg: Config) -> str | None:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else the file store under the train
    folder; None when that folder is object storage (MLflow's file store is local only)."""
    uri = cfg.train.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = train_dir(cfg)
    return None if storage.is_uri(folder) else Path(folder, "mlruns").absolute().as_uri()


def wandb_project(cfg: Config) -> str:
    return cfg.train.tracking.wandb_project or os.environ.get("WANDB_PROJECT") or "palign"


def run_params(cfg: Config, extra: Mapping[str, Any]) -> dict[str, str]:
    """The config as flat ``section.field`` parameters (lists and mappings as JSON), and
    ``extra`` (parameter counts); values cut to ``PARAM_CHARS``, keys to what MLflow takes."""
    flat = {**fingerprint.flatten(cfg.model_dump(mode="json")), **extra}
    out = {}
    for key, value in flat.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[re.sub(r"[^\w\-. /]", "_", key)[:250]] = text[:PARAM_CHARS]
    return out


class Tracker(Protocol):
    name: str

    def state(self) -> dict[str, Any]:
        """What a resume needs to continue this run (kept in ``tracking.json``)."""

    def start(self, params: dict[str, str], counts: Mapping[str, Any]) -> None:
        """``params``: the flat run parameters (config and ``counts``), as strings."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, model_dir: str) -> None: ...

    def close(self, done: bool) -> None: ...


class TensorBoard:
    """Event files written by tensorboardX (no TensorFlow, no ``tensorboard`` needed). An
    object-storage folder is written locally and uploaded at the end."""

    name = "tensorboard"

    def __init__(self, cfg: Config, start_step: int) -> None:
        from tensorboardX import SummaryWriter

        self.target = tensorboard_dir(cfg)
        remote = storage.is_uri(self.target)
        self.local = tempfile.mkdtemp(prefix="palign-tb-") if remote else self.target
        self.remote = remote
        self.step = start_step
        # the resume does steps start_step+1.. again: hide what the failed run logged of them;
        # the suffix orders two files opened within one second (their names hold seconds)
        self.writer = SummaryWriter(self.local, purge_step=start_step + 1,
                                    filename_suffix=f".{start_step:08d}")

    def state(self) -> dict[str, Any]:
        return {"dir": self.target}

    def start(self, params: dict[str, str], counts: Mapping[str, Any]) -> None:
        table = "\n".join(f"    {k}: {v}" for k, v in params.items())  # indented: verbatim
        self.writer.add_text("config", table, self.step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.step = step

    def finish(self, model_dir: str) -> None:
        self.writer.add_text("export_dir", model_dir, self.step)

    def close(self, done: bool) -> None:
        self.writer.close()
        if self.remote:
            for path in Path(self.local).rglob("*"):
                if path.is_file():
                    rel = path.relative_to(self.local).as_posix()
                    storage.write_bytes(storage.join(self.target, rel), path.read_bytes())
            shutil.rmtree(self.local, ignore_errors=True)


class MLflow:
    """One MLflow run through ``MlflowClient`` (never the fluent API's process-wide state)."""

    name = "mlflow"

    def __init__(self, cfg: Config, saved: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._entities = Metric, Param, RunTag
        self.uri = mlflow_uri(cfg)
        if self.uri is None:  # validate says so first; a worker's view of the same
            raise ValueError(tracker_problems(cfg, lambda _: True)[-1])
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store (the only one mlflow-skinny can open) behind an
            # opt-in; palign's default store is one, so it opts in unless told otherwise
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        run_id = saved.get("run_id") if saved.get("tracking_uri") == self.uri else None
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:  # deleted or another store: a new run
                run_id = None
        if not run_id:
            name = cfg.train.tracking.experiment or cfg.run.name
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(
                experiment, run_name=cfg.run.name,
                tags={"palign.output_dir": str(cfg.run.output_dir)}).info.run_id
        self.run_id: str = run_id

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def start(self, params: dict[str, str], counts: Mapping[str, Any]) -> None:
        _, Param, RunTag = self._entities
        # a parameter is written once: a resume adds new ones, and notes changed ones as tags
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"changed.{k}", v) for k, v in params.items()
                   if k in logged and logged[k] != v]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])
        for i in range(0, len(changed), BATCH):
            self.client.log_batch(self.run_id, tags=changed[i:i + BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        Metric = self._entities[0]
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def finish(self, model_dir: str) -> None:
        self.client.set_tag(self.run_id, "export_dir", model_dir)

    def close(self, done: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if done else "FAILED")


class WandB:
    """A W&B run, resumed by its id (``resume="allow"``). Steps are logged as a metric of
    their own, so a resume may log a step again (W&B drops out-of-order ``step=`` values)."""

    name = "wandb"

    def __init__(self, cfg: Config, saved: Mapping[str, Any]) -> None:
        import wandb

        project = wandb_project(cfg)
        run_id = saved.get("id") if saved.get("project") == project else None
        folder = train_dir(cfg)
        self.scratch = tempfile.mkdtemp(prefix="palign-wandb-") if storage.is_uri(folder) else None
        self.run = wandb.init(
            project=project, name=cfg.run.name, id=run_id,  # None: W&B makes one
            resume="allow", dir=self.scratch or folder, config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.project = project

    def state(self) -> dict[str, Any]:
        return {"project": self.project, "id": self.run.id}

    def start(self, params: dict[str, str], counts: Mapping[str, Any]) -> None:
        # the config went in nested at init; the counts join it
        self.run.config.update(dict(counts), allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def finish(self, model_dir: str) -> None:
        self.run.summary["export_dir"] = model_dir

    def close(self, done: bool) -> None:
        self.run.finish(exit_code=0 if done else 1)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class Trackers:
    """The trackers of one training process: none on ranks other than 0, nor without
    ``train.report_to``. Each call goes to every tracker still on."""

    def __init__(self, cfg: Config | None = None, opened: list[Tracker] | None = None) -> None:
        self.cfg, self.on = cfg, list(opened or [])
        self.done = False

    def start(self, params: Mapping[str, Any]) -> None:
        """The run's parameters: the config and ``params`` (parameter counts); a failure here
        fails the run."""
        if not self.on or self.cfg is None:
            return
        flat = run_params(self.cfg, params)
        for tracker in self.on:
            try:
                tracker.start(flat, params)
            except Exception as err:
                raise RuntimeError(f"train.report_to: {tracker.name} failed to start: "
                                   f"{type(err).__name__}: {err}") from err

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Step ``step``'s numbers (those of ``STEP_METRICS`` that ``metrics`` has)."""
        if not self.on:
            return
        numbers = {k: float(metrics[k]) for k in STEP_METRICS
                   if isinstance(metrics.get(k), int | float)}  # NaN too: worth seeing
        self._each(lambda t: t.log(numbers, step), f"step {step}")

    def finish(self, model_dir: str) -> None:
        """The run is complete and exported to ``model_dir``."""
        self._each(lambda t: t.finish(model_dir), "the end")
        self.done = True

    def close(self) -> None:
        """Flush and close every tracker (marking its run failed unless ``finish`` came)."""
        self._each(lambda t: t.close(self.done), "close")
        self.on = []

    def _each(self, call: Callable[[Tracker], None], when: str) -> None:
        for tracker in list(self.on):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - a dashboard never stops training
                logger.warning("train.report_to: %s failed at %s and is off for the rest of "
                               "this run: %s: %s", tracker.name, when, type(err).__name__, err)
                self.on.remove(tracker)


def open_trackers(cfg: Config, rank: int, start_step: int) -> Trackers:
    """The trackers ``train.report_to`` names, on rank 0 (a no-op on the others), their runs
    resumed from ``tracking.json`` where it names them; it writes that file back. Any that
    cannot be opened fails the run here."""
    tc = cfg.train
    if rank != 0 or not tc.report_to:
        return Trackers()
    path = storage.join(train_dir(cfg), TRACKING_FILE)
    saved = json.loads(storage.read_text(path)) if storage.is_file(path) else {}
    opened: list[Tracker] = []
    try:
        for name in tc.report_to:
            try:
                if name == "tensorboard":
                    opened.append(TensorBoard(cfg, start_step))
                elif name == "mlflow":
                    opened.append(MLflow(cfg, saved.get(name, {})))
                else:
                    opened.append(WandB(cfg, saved.get(name, {})))
            except Exception as err:
                raise RuntimeError(f"train.report_to: {name} failed to start: "
                                   f"{type(err).__name__}: {err}") from err
        state = {**saved, **{t.name: t.state() for t in opened}}
        storage.write_text(path, json.dumps(state, indent=1))
    except BaseException:
        Trackers(cfg, opened).close()
        raise
    logger.info("train.report_to: %s", ", ".join(
        f"{t.name} ({', '.join(f'{k} {v}' for k, v in t.state().items())})" for t in opened))
    return Trackers(cfg, opened)
