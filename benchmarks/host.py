"""The machine a benchmark ran on, for its JSON (benchmarks are run as scripts from this folder)."""

from __future__ import annotations

import os
import platform
from typing import Any


def host_info() -> dict[str, Any]:
    """Host name, CPU model, usable cores, Python and torch versions."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__}
