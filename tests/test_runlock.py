"""One run per output folder: a second holder refuses and names the first; a lock whose holder
is gone (its process exited, or its heartbeat stopped) is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from palign.core.runlock import LOCK_NAME, RunLock, RunLocked


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
from palign.core.runlock import RunLock
with RunLock(sys.argv[1], stale_s=1.0, heartbeat_s=0.1):
    print("held", flush=True)
    time.sleep(60)
print("went on", flush=True)
"""


def test_a_holder_whose_lock_was_taken_over_stops_with_a_failure(tmp_path):
    """A holder paused past stale_s (SIGSTOP: a frozen VM or driver) loses its lock to a new
    run; woken, it stops at once, even from a blocking call, instead of going on beside it."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # its heartbeat is now older than stale_s
        taker = RunLock(tmp_path, stale_s=1.0, heartbeat_s=0.1)
        taker.acquire()  # taken over: the holder's process is alive, but silent
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "went on" not in out
        assert "LockLost" in err and "was taken over by another palign run" in err
        assert f"pid {os.getpid()}" in err  # names the run that holds it now
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == taker.token
    finally:
        taker.release()
    assert not (tmp_path / LOCK_NAME).exists()
