"""This process's memory as Linux reports it in ``/proc/self/status``: the resident set now
(``VmRSS``) and its high-water mark (``VmHWM``), the peak of this address space alone (unlike
getrusage's ``ru_maxrss``, which a forked child inherits from its parent). ``reset_peak`` sets
the mark back to the current RSS, so a peak can be measured for one step. Linux only."""

from __future__ import annotations

import contextlib
import threading

MIB = 2**20


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")  # a kernel (or sandbox) that does not report the field


def rss_mib() -> float:
    """The resident set now, in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """The resident set's high-water mark, in MiB: since the process started, or since the last
    ``reset_peak`` that took."""
    return _status_kib("VmHWM") / 1024


def reset_peak() -> bool:
    """Set the high-water mark back to the current RSS (``clear_refs`` 5); False where the kernel
    does not allow it (the mark then still counts from the process's start)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
        return True
    return False


class RssSampler:
    """The resident set's peak per label while the ``with`` runs: a thread samples it (in MiB)
    every ``period`` seconds under the current ``label`` (None: not sampled), and so do entering
    and leaving, so a labelled run shorter than one period still has its peak."""

    def __init__(self, period: float = 0.02, label: str | None = None) -> None:
        self.period = period
        self.label = label
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        label = self.label
        if label is not None:
            self.peaks[label] = max(self.peaks.get(label, 0.0), rss_mib())

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def lean_driver_memory() -> None:
    """Make the driver give back what it frees. It reads and gathers indexes from many threads
    in large transient buffers (index tables, hash sets of ids), and both Arrow's default pool
    (mimalloc keeps each thread's freed pages) and glibc's heap (its mmap threshold rises to
    the largest buffer freed, and what is freed below it stays in the heap) kept them, so the
    peak grew with the folder. Here Arrow allocates from the C library, and glibc serves
    buffers over 128 KiB by mmap, returned on free: the driver's index work on 200k rows
    raised its peak by 18 MiB this way, 47 MiB with mimalloc, 54 MiB with the system pool
    alone. Workers, which move rows, keep the defaults."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    libc = ctypes.util.find_library("c")
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: its own defaults
            ctypes.CDLL(libc).mallopt(M_MMAP_THRESHOLD, 128 * 1024)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it fixes the threshold
