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


def use_system_arrow_pool() -> None:
    """Arrow's allocations in this process from the C library's allocator, for the driver. It
    reads and gathers indexes from many threads, and mimalloc (Arrow's default pool) keeps each
    thread's freed pages: gathering 200k rows of indexes raised the peak by 53 MiB with it and
    by 11 MiB with this one. Workers, which move rows, keep Arrow's default."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
