"""Where a training run keeps things: names and paths only (no I/O beyond resolving them).

- ``storage_path(cfg)``: Ray Train's storage, ``train.storage_path`` or
  ``<output_dir>/train/ray`` (a path or a URI);
- ``run_name(cfg)``: ``<run.name>-train``, the run's folder under it, where the checkpoints
  ``checkpoint_<step:08d>/`` go (Ray Train's and torchrun's alike);
- the exported model: ``cfg.trained_model_dir()``, ``<output_dir>/train/model``.
"""

from __future__ import annotations

from pathlib import Path

from palign.config import Config
from palign.config.paths import train_storage_path
from palign.data import storage

DS_TAG = "ds"  # DeepSpeed's checkpoint tag (sub-folder) inside each checkpoint directory
STATE_FILE = "train_state.json"  # written by rank 0 last: marks a checkpoint complete
CHECKPOINT_PREFIX = "checkpoint_"
DATA_KEY = "_train_data"  # in the workers' config dict under Ray: the prepared units' folder


def storage_path(cfg: Config) -> str:
    """Ray Train storage: ``train.storage_path``, default ``<output_dir>/train/ray``: an
    absolute path or a URI (Ray Train writes checkpoints to object storage itself). The
    default lives with the config (``absolute_paths`` fills it in for the workers)."""
    return train_storage_path(cfg)


def run_name(cfg: Config) -> str:
    return f"{cfg.run.name}-train"


def run_dir(cfg: Config) -> Path:
    """``<storage_path>/<run.name>-train`` as a local path: torchrun's checkpoints (under Ray,
    Ray Train keeps the run's folder on any storage)."""
    root = storage_path(cfg)
    if storage.is_uri(root):
        raise ValueError(f"train.storage_path: {root}: torchrun checkpoints need a path on the "
                         "machine; object storage works under Ray Train")
    return Path(root) / run_name(cfg)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"
