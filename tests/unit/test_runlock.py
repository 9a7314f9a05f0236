"""One run per output folder: a second holder refuses and names the first; a lock whose holder
is gone (its process exited, or its heartbeat stopped) is taken over. On object storage (the
suite's S3-compatible server) the same holds however the drivers' requests interleave: a proxy
in front of the server holds one driver's request while the other acts, as a slow network or a
paused machine would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from s3_proxy import HoldingProxy
from s3_server import BUCKET

from palign.data.runlock import LOCK_NAME, RunLock, RunLocked


def test_second_holder_refuses_naming_the_first(tmp_path):
    with RunLock(tmp_path, stale_s=60):
        with pytest.raises(RunLocked) as exc:
            RunLock(tmp_path, stale_s=60).acquire()
        msg = str(exc.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "started" in msg
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end
    with RunLock(tmp_path, stale_s=60):  # and free again
        pass


def test_lock_of_an_exited_process_is_taken_over(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead, "token": "old", "started": "then"}))
    with RunLock(tmp_path, stale_s=3600):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()


def test_lock_without_heartbeat_is_taken_over_and_a_live_one_is_not(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "another-host", "pid": 1, "token": "old", "started": "then"}))
    with pytest.raises(RunLocked, match="another-host"):
        RunLock(tmp_path, stale_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))  # its holder stopped beating 2 minutes ago
    with RunLock(tmp_path, stale_s=60):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_holder_keeps_its_lock_fresh(tmp_path):
    with RunLock(tmp_path, stale_s=1.0, heartbeat_s=0.1):
        old = time.time() - 30
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1.0
        with pytest.raises(RunLocked):
            RunLock(tmp_path, stale_s=1.0).acquire()


HOLDER = """
import sys, time
from palign.data.runlock import RunLock
with RunLock(sys.argv[1], stale_s=1.0, heartbeat_s=0.1):
    print("held", flush=True)
    time.sleep(60)
print("went on", flush=True)
"""


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_holder_whose_lock_was_taken_over_stops_with_a_failure(tmp_path, sigint):
    """A holder paused past stale_s (SIGSTOP: a frozen VM or driver) loses its lock to a new
    run; woken, it stops at once, even from a blocking call, instead of going on beside it.
    Also when it was started with SIGINT ignored (``cmd &`` in a script, as CI may start the
    suite), which the heartbeat's interrupt would otherwise not wake."""
    import signal

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint if sigint == "ignored" else None)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # its heartbeat is now older than stale_s
        taker = RunLock(tmp_path, stale_s=1.0, heartbeat_s=0.1)
        taker.acquire()  # taken over: the holder's process is alive, but silent
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # say what the holder did before it hung
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the woken holder did not stop in 30 s; its stderr:\n{err[-3000:]}")
        assert proc.returncode == 1 and "went on" not in out
        assert "LockLost" in err and "was taken over by another palign run" in err
        assert f"pid {os.getpid()}" in err  # names the run that holds it now
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == taker.token
    finally:
        taker.release()
    assert not (tmp_path / LOCK_NAME).exists()


# -- object storage ----------------------------------------------------------------------------

DRIVER = """
import sys, time
from palign.data.runlock import RunLock, RunLocked
try:
    with RunLock(sys.argv[1], stale_s=float(sys.argv[2]), heartbeat_s=0.1):
        print("held", flush=True)
        time.sleep(20)
    print("went on", flush=True)
except RunLocked as err:
    print("refused:", err, flush=True)
"""


def _s3():
    import boto3

    return boto3.client("s3")  # the s3 fixture's environment: the suite's server


def _folder() -> tuple[str, str]:
    """A fresh s3:// output folder and its lock's key."""
    prefix = f"runlock-{uuid.uuid4().hex[:8]}"
    return f"s3://{BUCKET}/{prefix}", f"{prefix}/{LOCK_NAME}"


def _lock_info(key: str) -> dict | None:
    try:
        return json.loads(_s3().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except _s3().exceptions.NoSuchKey:
        return None


def _put_lock(key: str, **info) -> None:
    """A lock written by another palign run (an unconditional write, as its heartbeat was)."""
    info = {"host": "another-host", "pid": 1, "token": "old", "started": "then", **info}
    _s3().put_object(Bucket=BUCKET, Key=key, Body=json.dumps(info).encode())


def _is_lock_write(request: bytes) -> bool:
    line = request.split(b"\r\n", 1)[0]
    return line.split(b" ", 1)[0] in (b"PUT", b"POST", b"DELETE") and LOCK_NAME.encode() in line


def _not_a_create(request: bytes) -> bool:
    return _is_lock_write(request) and b"if-none-match" not in request.lower()


def _driver(folder: str, stale_s: float, proxy: HoldingProxy) -> subprocess.Popen:
    """A palign driver in its own process that reaches the store through ``proxy``."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url}
    return subprocess.Popen([sys.executable, "-c", DRIVER, folder, str(stale_s)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _acquire_when_stale(lock: RunLock, within_s: float = 15.0) -> RunLock:
    """``lock.acquire()``, again until the lock there has gone stale and is taken over."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            lock.acquire()
            return lock
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_two_drivers_started_at_once_on_s3_one_wins(s3):
    folder, key = _folder()
    locks = [RunLock(folder, stale_s=60, heartbeat_s=30) for _ in range(2)]
    start = threading.Barrier(2)
    outcome: dict[int, object] = {}

    def drive(i: int) -> None:
        start.wait()
        try:
            locks[i].acquire()
            outcome[i] = "held"
        except RunLocked as err:
            outcome[i] = err

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, out in outcome.items() if out == "held"]
    assert len(winners) == 1, outcome
    refused = str(outcome[1 - winners[0]])
    assert f"pid {os.getpid()}" in refused and socket.gethostname() in refused
    assert _lock_info(key)["token"] == locks[winners[0]].token
    locks[winners[0]].release()
    assert _lock_info(key) is None  # released: deleted, being still the winner's


def test_a_create_that_lands_late_on_s3_loses(s3):
    """Driver B's create is held on its way while driver A takes the folder: when B's write
    lands, it must not replace A's lock; B refuses, naming A."""
    folder, key = _folder()
    taker = RunLock(folder, stale_s=60, heartbeat_s=30)
    proxy = HoldingProxy(s3["AWS_ENDPOINT_URL_S3"], _is_lock_write, taker.acquire)
    try:
        late = _driver(folder, 60, proxy)
        out, err = late.communicate(timeout=60)
        assert proxy.done.is_set() and proxy.outcome is None, (proxy.outcome, err)
        assert out.startswith("refused:"), (out, err)
        assert f"pid {os.getpid()}" in out  # names the run that holds it
        assert _lock_info(key)["token"] == taker.token
    finally:
        proxy.close()
        taker.release()
    assert _lock_info(key) is None


def test_lock_age_on_s3_is_the_stores_not_the_writers(s3):
    """A lock just written by a run whose clock is an hour behind is live; one that has not
    been rewritten for longer than stale_s is stale, though its writer's clock says it is
    from the future."""
    folder, key = _folder()
    _put_lock(key, beat=time.time() - 3600)
    with pytest.raises(RunLocked, match="another-host"):
        RunLock(folder, stale_s=60).acquire()
    _put_lock(key, beat=time.time() + 3600)
    with _acquire_when_stale(RunLock(folder, stale_s=1, heartbeat_s=30)) as lock:
        assert _lock_info(key)["token"] == lock.token
    assert _lock_info(key) is None


def test_a_heartbeat_on_s3_that_finds_its_lock_taken_over_stops_the_holder(s3):
    """Holder B's heartbeat is held on its way until its lock goes stale and run A takes the
    folder over; when B's heartbeat lands it must not overwrite A's lock: B stops with
    LockLost, naming A, and leaves A's lock in place."""
    folder, key = _folder()
    taker = RunLock(folder, stale_s=1, heartbeat_s=30)
    proxy = HoldingProxy(s3["AWS_ENDPOINT_URL_S3"], _not_a_create,
                         lambda: _acquire_when_stale(taker))
    try:
        holder = _driver(folder, 60, proxy)
        out, err = holder.communicate(timeout=60)
        assert proxy.done.is_set() and proxy.outcome is taker, (proxy.outcome, err)
        assert holder.returncode == 1 and out.strip() == "held", (out, err)
        assert "LockLost" in err and f"pid {os.getpid()}" in err
        assert _lock_info(key)["token"] == taker.token
    finally:
        proxy.close()
        taker.release()
    assert _lock_info(key) is None


def test_a_stale_lock_on_s3_is_broken_only_if_unchanged(s3):
    """Driver T finds the lock stale and takes it over, but its takeover is held on its way
    while the old holder beats again: the takeover must fail, and T refuse, naming the holder."""
    folder, key = _folder()
    _put_lock(key, beat=time.time() - 100)
    time.sleep(2.1)  # stale for stale_s=1 by the store's clock
    proxy = HoldingProxy(s3["AWS_ENDPOINT_URL_S3"], _not_a_create,
                         lambda: _put_lock(key, beat=time.time()))
    try:
        breaker = _driver(folder, 1, proxy)
        out, err = breaker.communicate(timeout=60)
        assert proxy.done.is_set() and proxy.outcome is None, (proxy.outcome, err)
        assert out.startswith("refused:") and "another-host" in out, (out, err)
        assert _lock_info(key)["token"] == "old"
    finally:
        proxy.close()
