"""palign as a Ray job on a real Ray head started by the test (`ray start --head` with the
dashboard, a metrics export port and token authentication, as Ray 2.60 has by default):

- `ray job submit` of ray_jobs/pipeline.py reaches SUCCEEDED and writes its outputs, and the
  head's metrics endpoint shows palign's metrics with non-zero values;
- killing an engine actor mid-stage (found by its actor id through Ray's state API) still
  yields every id exactly once in the same job: Ray Data restarts the actor and retries the
  rows it held;
- a job stopped with `ray job stop` and submitted again resumes: every id exactly once.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ports import free_port

from palign.data.shards import read_rows

pytestmark = [pytest.mark.ray, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO = [json.loads(line) for line in (ROOT / "data/demo/problems.jsonl").read_text().splitlines()]
ENGINE_ACTOR = "MapWorker(MapBatches(StageWorker))"


class Head:
    """A Ray head for one test module, stopped by signalling its own `ray start --block`
    process group (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.dash, self.metrics = free_port(), free_port(), free_port()
        self.token = secrets.token_hex(32)
        # How a user passes the token: RAY_AUTH_TOKEN (or a file in RAY_AUTH_TOKEN_PATH, or
        # ~/.ray/auth_token) for `ray start`, `ray job ...` and drivers alike.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        self.address = f"http://127.0.0.1:{self.dash}"
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}",
             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dash}", f"--metrics-export-port={self.metrics}",
             "--disable-usage-stats"],
            env=self.env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 120
        while self.ray("job", "list", check=False).returncode != 0:
            assert self.proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)

    def ray(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # The address goes before any `--`: what follows it is the job's entrypoint.
        done = subprocess.run([str(BIN / "ray"), *args[:2], "--address", self.address,
                               *args[2:]],
                              env=self.env, capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    def submit(self, config: Path, runtime_env: dict) -> str:
        done = self.ray("job", "submit", "--no-wait", "--working-dir", str(ROOT),
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        sys.executable, "ray_jobs/pipeline.py", "--config", str(config))
        return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)

    def status(self, job: str) -> str:
        done = self.ray("job", "status", job)
        out = done.stdout + done.stderr  # the CLI's logger may write to either
        for words, state in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"),
                             ("failed", "FAILED")):
            if f"' {words}" in out:
                return state
        return re.findall(r"(PENDING|RUNNING|STOPPED|SUCCEEDED|FAILED)", out)[-1]

    def wait(self, job: str, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while (state := self.status(job)) in ("PENDING", "RUNNING"):
            assert time.time() < deadline, f"{job} still {state}"
            time.sleep(3)
        return state

    def logs(self, job: str) -> str:
        done = self.ray("job", "logs", job, check=False)
        return done.stdout + done.stderr

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:  # a graceful stop takes Ray's head about 30 s; this one holds nothing worth it
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        # `ray start` records its head as the machine's "current cluster", which a later
        # ray.init() without an address would try to join; forget it once it is gone.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


@pytest.fixture(scope="module")
def head(tmp_path_factory, no_ray):
    # no_ray: the session's in-process Ray would hold ports the head's dashboard agent needs.
    h = Head(tmp_path_factory.mktemp("ray-head"))
    yield h
    h.close()


def runtime_env() -> dict:
    """ray_jobs/runtime_env.yaml as shipped, with the env vars this machine needs (the file's
    cache paths are the cluster nodes' own)."""
    env = yaml.safe_load((ROOT / "ray_jobs/runtime_env.yaml").read_text())
    env.pop("working_dir")  # given on the command line, as the README's line does
    env["env_vars"] = {k: v for k, v in os.environ.items()
                       if k in ("PALIGN_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE")}
    env["env_vars"]["TOKENIZERS_PARALLELISM"] = "false"
    return env


LONG_COT = " ".join(f"Step {i}: we add {i} and {i + 1} to get {2 * i + 1}." for i in range(700))
TOO_LONG = {"id": "too-long-for-engine", "question": "Add them up.", "answer": "7",
            "cot": LONG_COT}  # the engine rejects its prompts: a row rejected mid-stage


def write_config(tmp: Path, n_rows: int, extra_rows: tuple = (), **over) -> Path:
    rows = [*DEMO[:n_rows], *extra_rows]  # demo rows with a CoT: no teacher needed
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "run": {"name": "job", "output_dir": str(tmp / "out"), "stages": ["truncate", "align"]},
        "ray": {"progress_bars": False},
        "data": {"path": str(tmp / "data.jsonl")},
        "models": {"student": "smollm2-135m"},
        "engine": {"backend": "auto", "dtype": "float32", "max_model_len": 2048,
                   "batch_size": 2, "cpus_per_replica": 1, "cpu_kv_cache_gib": 1,
                   # one batch at a time per actor: a kill after the first commit lands midway
                   "max_in_flight": 2},
        "truncate": {"verdict": "score"},
        "align": {"sampling": {"max_tokens": 32}},
        "output": {"shard_rows": 1},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ids(out: Path, stage: str) -> Counter:
    return Counter(r["id"] for r in [*read_rows(out / stage), *read_rows(out / stage / "rejects")])


def metric_values(text: str, name: str) -> dict[str, float]:
    """{labels: value} of every sample of ``name`` in a Prometheus text page."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


@pytest.mark.timeout(600)
def test_submitted_pipeline_succeeds_and_reports_metrics(head, tmp_path):
    from palign.runtime.telemetry import EXPORTED_NAMES

    cfg = write_config(tmp_path, 3, extra_rows=(TOO_LONG,))
    job = head.submit(cfg, runtime_env())
    seen: dict[str, dict[str, float]] = {}
    deadline = time.time() + 900
    while time.time() < deadline:
        state = head.status(job)
        page = head.scrape()
        for name in EXPORTED_NAMES:
            vals = {k: v for k, v in metric_values(page, name).items() if v > 0}
            if vals:
                seen[name] = vals
        if state not in ("PENDING", "RUNNING"):
            break
        time.sleep(3)
    logs = head.logs(job)
    assert state == "SUCCEEDED", logs[-4000:]
    out = tmp_path / "out"
    assert len(list(read_rows(out / "align"))) == 3
    rejects = {r["id"]: r["reason"] for r in read_rows(out / "truncate/rejects")}
    assert "prompt too long" in rejects["too-long-for-engine"]  # rejected, the job went on
    # the stage's progress line on the job's page (at most every 10 s, and at its end)
    assert re.search(r"truncate: (\d+)/\1 rows \(100%\), 1 rejects", logs), logs[-4000:]
    page = head.scrape()
    deadline = time.time() + 30
    for name in EXPORTED_NAMES:  # the last report of a finished job can trail it a little
        while name not in seen and time.time() < deadline:
            vals = {k: v for k, v in metric_values(page, name).items() if v > 0}
            if vals:
                seen[name] = vals
            else:
                time.sleep(3)
                page = head.scrape()
    engine_side = [n for n in EXPORTED_NAMES if "train" not in n]
    missing = [n for n in engine_side if n not in seen]
    assert not missing, f"not exported with non-zero values: {missing}"
    assert any('stage="truncate"' in k for k in seen["ray_palign_rows_out_total"])
    assert any('stage="align"' in k for k in seen["ray_palign_engine_tokens_total"])


STATE_SCRIPT = """
import os, signal, sys, time
from ray.util.state import get_actor, list_actors
if sys.argv[1] == "kill":
    deadline = time.time() + 300
    while time.time() < deadline:
        alive = list_actors(address=sys.argv[2], filters=[("class_name", "=", sys.argv[3]),
                                                          ("state", "=", "ALIVE")])
        if alive:
            break
        time.sleep(1)
    actor = get_actor(alive[0].actor_id, address=sys.argv[2])
    os.kill(actor.pid, signal.SIGKILL)  # a crash, as an OOM kill or a segfault would be
    print(actor.actor_id)
else:
    print(get_actor(sys.argv[3], address=sys.argv[2]).num_restarts)
"""


def state(head: Head, *args: str) -> str:
    """Ray's state API, run with the head's token as a user's script would be."""
    done = subprocess.run([sys.executable, "-c", STATE_SCRIPT, *args[:1], head.address,
                           *args[1:]], env=head.env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def summary_row(logs: str, stage: str) -> list[int]:
    """in, out, rejected, resumed of ``stage`` in the run summary a job prints."""
    m = re.search(rf"^{stage}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", logs, re.MULTILINE)
    assert m, logs[-3000:]
    return [int(x) for x in m.groups()]


def wait_for_first_shard(head: Head, job: str, folder: Path) -> None:
    deadline = time.time() + 600
    while not list(folder.glob("part-*")):
        assert head.status(job) in ("PENDING", "RUNNING"), head.logs(job)[-4000:]
        assert time.time() < deadline, f"no shard in {folder} yet"
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_killed_engine_actor_and_stopped_job_lose_nothing(head, tmp_path):
    n = 10
    only_truncate = {"run": {"name": "job", "output_dir": str(tmp_path / "out"),
                             "stages": ["truncate"]}}  # the faults hit truncate; align adds time
    cfg = write_config(tmp_path, n, **only_truncate)
    out = tmp_path / "out"
    env = runtime_env()

    # 1. An engine actor is killed mid-stage; the same job finishes with every id once.
    job = head.submit(cfg, env)
    wait_for_first_shard(head, job, out / "truncate")
    before = sum(ids(out, "truncate").values())
    assert before < n, "the stage finished before the kill"
    actor_id = state(head, "kill", ENGINE_ACTOR)  # found by class, killed by its actor id
    assert head.wait(job) == "SUCCEEDED", head.logs(job)[-4000:]
    assert int(state(head, "restarts", actor_id)) >= 1  # Ray restarted that same actor
    counts = ids(out, "truncate")
    assert set(counts) == {r["id"] for r in DEMO[:n]} and set(counts.values()) == {1}

    # 2. A job stopped midway and submitted again: every id once.
    over = {"run": {"name": "job", "output_dir": str(tmp_path / "out2"), "stages": ["truncate"]}}
    cfg2 = write_config(tmp_path, n, **over)
    out2 = tmp_path / "out2"
    job = head.submit(cfg2, env)
    wait_for_first_shard(head, job, out2 / "truncate")
    head.ray("job", "stop", job)
    assert head.wait(job) == "STOPPED"
    partial = sum(ids(out2, "truncate").values())
    assert 0 < partial < n
    job = head.submit(cfg2, env)
    assert head.wait(job) == "SUCCEEDED", head.logs(job)[-4000:]
    assert summary_row(head.logs(job), "truncate")[3] == partial  # those were not redone
    counts = ids(out2, "truncate")
    assert set(counts) == {r["id"] for r in DEMO[:n]} and set(counts.values()) == {1}
