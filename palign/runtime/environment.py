"""The environment palign's Ray workers run in: the variables they get from the driver (one list
of names), and the folder their log files go to.

A local Ray (``init_ray`` without an address) and the train stage's workers get these from the
driver's environment, when set. A Ray job's workers get the job's ``runtime_env``
(``ray_jobs/runtime_env.yaml``), whose variables are names from this list too (checked by
``tests/unit/test_cluster_files.py``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FORWARDED_ENV = (
    "PALIGN_CACHE_DIR",  # where models are staged, each node's own disk
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",  # DeepSpeed's compiled ops
    "PALIGN_DS_SHM_COMM",  # training: DeepSpeed's shared-memory collectives
    "PYTHONPATH",  # where an engine backend or a callback named by import path is found
)


def forwarded_env() -> dict[str, str]:
    """The forwarded variables this process has set."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def actor_log_dir() -> Path:
    """The Ray session's log folder when this process belongs to a Ray session, else a
    temporary folder."""
    try:
        import ray

        node = ray._private.worker._global_node  # the session this worker belongs to
        if node is not None:
            return Path(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - not in a Ray session
        pass
    return Path(tempfile.gettempdir())
