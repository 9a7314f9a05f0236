"""The config as a process that starts in another folder must see it: local paths absolute.

A Ray actor, a Ray Train worker or a torchrun rank does not share the driver's working folder,
so a relative path in the config would name another file there. ``absolute_paths`` is the one
place that knows which fields are paths; the runner, the evaluate driver, the train driver and
the torchrun entry call it where they hand the config on, and nowhere else: a stage's
fingerprint records the paths as they are at that point (``palign.runtime.fingerprints``).

URIs (``s3://``, ``gs://``) stay as they are.
"""

from __future__ import annotations

import os

from palign.common import uri
from palign.config.root import Config


def train_storage_path(cfg: Config) -> str:
    """Ray Train's storage, where the checkpoints go: ``train.storage_path``, default
    ``<output_dir>/train/ray``; an absolute path or a URI."""
    return uri.absolute(cfg.train.storage_path or uri.join(cfg.stage_dir("train"), "ray"))


def absolute_paths(cfg: Config, student: bool = False) -> Config:
    """``cfg`` with every local path made absolute: ``run.output_dir``, ``data.path``,
    ``models.cache_dir`` (``~`` expanded), ``train.storage_path`` (its default filled in) and
    each ``evaluate.benchmarks[].path``. With ``student``, also ``models.student`` when it is a
    local folder: the train workers load it, while the row stages' fingerprints (checked by the
    pipeline before any stage starts) name the student as written, so the runner leaves it."""
    models: dict[str, str | None] = {}
    if cfg.models.cache_dir:
        models["cache_dir"] = uri.absolute(cfg.models.cache_dir)
    if student and not uri.is_uri(cfg.models.student) and os.path.isdir(cfg.models.student):
        models["student"] = uri.absolute(cfg.models.student)
    benchmarks = [b.model_copy(update={"path": uri.absolute(b.path)})
                  for b in cfg.evaluate.benchmarks]
    return cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"output_dir": uri.absolute(cfg.run.output_dir)}),
        "data": cfg.data.model_copy(update={"path": uri.absolute(cfg.data.path)}),
        "models": cfg.models.model_copy(update=models),
        "train": cfg.train.model_copy(update={"storage_path": train_storage_path(cfg)}),
        "evaluate": cfg.evaluate.model_copy(update={"benchmarks": benchmarks}),
    })
