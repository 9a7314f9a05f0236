"""The environment palign's Ray workers get from the driver: one list of names.

A local Ray (``init_ray`` without an address) and the train stage's workers get these from the
driver's environment, when set. A Ray job's workers get the job's ``runtime_env``
(``ray_jobs/runtime_env.yaml``), whose variables are names from this list too (checked by
``tests/test_cluster_files.py``)."""

from __future__ import annotations

import os

FORWARDED_ENV = (
    "PALIGN_CACHE_DIR",  # where models are staged, each node's own disk
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",  # DeepSpeed's compiled ops
    "PALIGN_DS_SHM_COMM",  # training: DeepSpeed's shared-memory collectives
    "PALIGN_TRAIN_FAIL_AT_STEP",  # training's fault-injection hook (tests)
)


def forwarded_env() -> dict[str, str]:
    """The forwarded variables this process has set."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
