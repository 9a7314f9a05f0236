"""vLLM's own OpenAI-compatible server on SmolLM2, on 127.0.0.1, for the remote-engine tests.

The tests of ``engine.backend: openai`` talk to the server a user runs (``vllm serve``), not
only to the stub of ``fake_openai``: its answers, usage, errors and key check are vLLM's own.
It is started once per test session (``conftest.py``, fixture ``openai_server``) by the first
test that asks for it, in the background (``start_paused``: its start overlaps that test's own
work), **paused** (SIGSTOP to its process group) whenever no test is talking to it
(``serving()``), and stopped after the last test that uses it. An idle vLLM slows what runs
beside it: measured here, a 1-step LoRA train stage took 46-47 s alone and 63-64 s beside an
idle server that used 2% of a core (its engine wakes 13 gloo transport threads about 100 times
a second each), and still 59-65 s beside a paused one (its 3 GB, in this VM), so it lives only
as long as its tests. Hence:

- ``nice 10`` and a process group of its own (the server and every child vLLM starts), which
  ``pause``/``resume`` stop and continue as one, and which a keeper process outside it (this
  file, ``serve`` mode) ends when the test process ends, however it ends (a paused process
  could not notice its parent's death by itself);
- ``--disable-log-stats`` and no access log: an idle server prints nothing;
- the engine core runs its model in its own process, without a worker process of its own
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which vLLM's CPU platform reads as "keep the
  executor in the engine core"): measured here it starts faster and idles as quietly (see
  ``ENGINE_IN_CORE``);
- ``--api-key``: the key of the variable ``KEY_ENV`` names (a made-up one, set by conftest),
  so a request without it is answered 401, as a provider would;
- its log (which prints its arguments, the key among them) and its caches live in a temporary
  folder of its own, outside every run folder and Ray's logs, which the tests scan for the key.

The process started is this file (``python vllm_server.py serve ...``), the keeper: it
resolves the model (materialising SmolLM2 on first use, which can take a while on a fresh
machine), starts the server in a new process group, writes that group's id to
``<folder>/server.pgid``, and waits; on SIGTERM (``stop``, or the test process's death through
PR_SET_PDEATHSIG) it continues and ends the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from ports import free_port

MODEL = "smollm2-135m"  # the short name palign resolves, and the name the server serves
KEY_ENV = "PALIGN_TEST_OPENAI_KEY"
# VLLM_ENABLE_V1_MULTIPROCESSING=0: the model runs in the engine core process instead of a
# worker process of its own (measured on the 2-core box: see the report of issue 27's tests).
ENGINE_IN_CORE = True
READY_POLL_S = 0.5
STOP_LIMIT_S = 20.0
GRACE_S = 5.0  # a continued server's own shutdown, measured over 20 s: not waited for longer
PR_SET_PDEATHSIG = 1


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process group serving ``MODEL``."""

    def __init__(self, key_env: str = KEY_ENV, engine_in_core: bool = ENGINE_IN_CORE) -> None:
        self.key_env = key_env
        self.model = MODEL
        self.engine_in_core = engine_in_core
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="palign-vllm-server-")
        self.log_path = os.path.join(self.folder, "server.log")
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_s: float | None = None  # seconds from start to the first answer
        self.paused = False
        self._ready: threading.Thread | None = None
        self._failed: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        """Start the server; returns at once (``wait_ready`` waits for it)."""
        env = dict(os.environ)
        cache = os.path.join(self.folder, "cache")
        env.update({
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": os.path.join(cache, "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
            "XDG_CACHE_HOME": cache,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.engine_in_core else "1",
            # the model's threads may use both cores (the server is niced below the tests)
            "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))),
        })
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "serve",
                 str(self.port), self.key_env, self.folder],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_end_with_parent)
        return self

    def start_paused(self, timeout: float) -> VLLMServer:
        """Start the server (from the calling thread: its end would end the server, through
        PR_SET_PDEATHSIG) and, in another thread, wait for it to answer and pause it; returns
        at once. ``serving`` waits for that."""
        self.start()

        def ready() -> None:
            try:
                self.wait_ready(timeout)
                self.pause()
            except RuntimeError as err:
                self._failed = str(err)

        self._ready = threading.Thread(target=ready, daemon=True, name="vllm-server-ready")
        self._ready.start()
        return self

    def wait_ready(self, timeout: float = 600) -> float:
        """Wait until ``GET /v1/models`` (with the key) lists the model; the seconds since
        ``start``. Raises RuntimeError with the log's tail if the server dies or is late."""
        assert self.proc is not None, "start() first"
        if self.ready_s is not None:
            return self.ready_s
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode} before "
                                   f"it answered; its log ends:\n{self.log_tail()}")
            if MODEL in self.served():
                self.ready_s = time.monotonic() - self.started
                return self.ready_s
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not answer within {timeout:g} s; its "
                                   f"log ends:\n{self.log_tail()}")
            time.sleep(READY_POLL_S)

    def _group(self) -> int | None:
        """The server's process group (the keeper writes it once the server is started)."""
        try:
            with open(os.path.join(self.folder, "server.pgid")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _signal(self, sig: int) -> None:
        group = self._group()
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)

    def pause(self) -> None:
        """Stop every process of the server (it keeps its port and its memory; a request
        waits until ``resume``)."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    @contextlib.contextmanager
    def serving(self) -> Iterator[VLLMServer]:
        """The server running for the block (once it answers), paused again after it (if it
        was). Raises RuntimeError if it never answered."""
        if self._ready is not None:
            self._ready.join()
            if self._failed:
                raise RuntimeError(self._failed)
        was_paused = self.paused
        self.resume()
        try:
            yield self
        finally:
            if was_paused:
                self.pause()

    def served(self) -> list[str]:
        """The model names ``GET /v1/models`` lists now ([] while it does not answer)."""
        request = urllib.request.Request(
            f"{self.url}/models",
            headers={"Authorization": f"Bearer {os.environ.get(self.key_env, '')}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                data = json.loads(answer.read())
        except (OSError, ValueError):  # not up yet (URLError, reset, time-out, HTML)
            return []
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, the key replaced (it prints its arguments)."""
        try:
            with open(self.log_path, "rb") as log:
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        key = os.environ.get(self.key_env)
        if key:
            text = text.replace(key, "***")
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The processes of the server's group (the server and every child vLLM started)."""
        group = self._group()
        if group is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(group)],
                             capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        """End the server (its keeper continues and ends the group) and remove the folder."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2 * STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_LIMIT_S)
        self._signal(signal.SIGCONT)  # whatever the keeper could not end
        self._signal(signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process ends, even killed (its own
    session keeps it out of the signals the test run gets, and stop() may never run)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _serve(port: str, key_env: str, folder: str) -> None:
    """The keeper: resolve the model, start vLLM's server in a process group of its own (its
    id in ``server.pgid`` beside the log), wait for it; on SIGTERM end that group (continued
    first: it may be paused), gracefully for ``GRACE_S``, then killed."""
    from palign.engines.models import resolve_model

    model = resolve_model(MODEL)
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", port,
            "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
            "--api-key", os.environ[key_env], "--enable-prompt-tokens-details",
            "--disable-log-stats", "--disable-uvicorn-access-log"]
    sys.stdout.flush()
    server = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
    pgid_file = os.path.join(folder, "server.pgid")
    with open(pgid_file + ".tmp", "w") as f:
        f.write(str(server.pid))
    os.replace(pgid_file + ".tmp", pgid_file)

    def end(signum: int, frame: object) -> None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, sig)
        try:
            server.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # the engine core, and anything left
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)  # its log and caches: nobody reads them now
        sys.exit(0)

    signal.signal(signal.SIGTERM, end)
    sys.exit(server.wait())


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(*sys.argv[2:5])
