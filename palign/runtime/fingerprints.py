"""Each stage's fingerprint from a config (``palign.data.fingerprint`` says what one is), the
check that runs before any work, and ``--restart``.

The chain: ingest's fingerprint is the data section and the source files' names and sizes;
each row stage's is its section, the model its engine serves (when it needs one: for a hub id,
the commit it resolves to, so a moved branch stops a resume), its prompt texts
(``Stage.prompts``), the seed, and the digest of its input's (the closest earlier stage the
config lists, or the ingest; a stage whose input this run does not make takes the input's
recorded one).
Evaluate's is per (model, benchmark) folder: its section without the lists, the model under
test's identity and the benchmark's ingest. Train records its own (``palign.train``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from palign.config import Config, DataSection, stage_names, stages_before
from palign.data import fingerprint, storage, transfer
from palign.data.digest import count_rows
from palign.data.layout import REJECTS
from palign.engines import is_remote
from palign.stages import registry

log = logging.getLogger(__name__)

ASIDE = "_aside"  # <output_dir>/_aside/<time>/<stage>: what --restart moved aside
INGEST = "ingest"


def model_identity(cfg: Config, model: str | None, remote: bool = False
                   ) -> dict[str, Any] | None:
    """A model's identity (``palign.engines.revisions.identity``: a hub id's commit, a hash of
    a folder's or a URI's files' names and sizes, a short name's wheel and member; a model a
    ``remote`` server serves by its name alone) and the chat template settings it gets (from
    the name as written)."""
    if model is None:
        return None
    from palign.engines.revisions import identity

    return {**identity(model, remote=remote),
            "chat_template_kwargs": cfg.template_kwargs_for(model)}


def ingest_fingerprint(data: DataSection) -> dict[str, Any]:
    return {"data": fingerprint.section_fields(data),
            "source": fingerprint.files_identity(storage.absolute(data.path))}


def stage_fingerprint(cfg: Config, stage: str, input_fp: dict[str, Any]) -> dict[str, Any]:
    definition = registry.get(stage)
    section = definition.section(cfg)
    model = definition.model(cfg) if definition.needs_engine(cfg) else None
    remote = model is not None and is_remote(section.engine.backend)
    return {stage: fingerprint.section_fields(section), "seed": cfg.run.seed,
            "model": model_identity(cfg, model, remote), "prompts": definition.prompts(),
            "input": fingerprint.digest(input_fp)}


def evaluate_fingerprint(cfg: Config, model_path: str, benchmark_fp: dict[str, Any]
                         ) -> dict[str, Any]:
    section = fingerprint.section_fields(cfg.evaluate)
    section = {k: v for k, v in section.items() if k not in ("models", "benchmarks")}
    return {"evaluate": section, "seed": cfg.run.seed,
            "model": model_identity(cfg, model_path, is_remote(cfg.evaluate.engine.backend)),
            "prompts": registry.get("evaluate").prompts(),
            "input": fingerprint.digest(benchmark_fp)}


def _has_rows(folder: str) -> bool:
    return bool(count_rows(folder) or count_rows(storage.join(folder, REJECTS)))


def row_stage_fingerprints(cfg: Config, stages: list[str]) -> dict[str, dict[str, Any]]:
    """The fingerprints the row stages of this run (and the ingest, when the first of them
    reads it) will write under: name -> fingerprint."""
    out: dict[str, dict[str, Any]] = {}
    row_stages = [s for s in stages if registry.get(s).driver == "rows"]
    for stage in row_stages:
        earlier = stages_before(cfg.run.stages, stage)
        if not earlier:
            out.setdefault(INGEST, ingest_fingerprint(cfg.data))
            upstream = out[INGEST]
        elif earlier[-1] in out:
            upstream = out[earlier[-1]]
        else:  # made by an earlier run: what it recorded
            upstream = fingerprint.read(cfg.stage_dir(earlier[-1])) or {"missing": earlier[-1]}
        out[stage] = stage_fingerprint(cfg, stage, upstream)
    return out


def check_run(cfg: Config, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Before any work: refuse (``ConfigChanged``) when a folder this run resumes holds rows
    made under another config. Returns the fingerprints to record as the stages start."""
    expected = row_stage_fingerprints(cfg, stages)
    for name, fp in expected.items():
        folder = cfg.stage_dir(name)
        what = "the ingested data" if name == INGEST else f"{name}'s output"
        fingerprint.check(folder, fp, what, name,
                          storage.exists(storage.join(folder, "_DONE")) if name == INGEST
                          else _has_rows(folder))
    return expected


def check_and_record(folder: str, fp: dict[str, Any], what: str, restart: str) -> None:
    """At a stage's start, under the run's lock: refuse rows of another config, else record
    the fingerprint the rows that follow are made under."""
    fingerprint.check(folder, fp, what, restart, _has_rows(folder))
    fingerprint.record(folder, fp)


def restart(cfg: Config, stage: str, train_checkpoints: str | None = None) -> str | None:
    """Move ``stage``'s output and every later stage's (and, for ``ingest``, every stage's)
    aside, under ``<output_dir>/_aside/<UTC time>/``, with the train checkpoints when train is
    among them and ``train_checkpoints`` is outside its folder (``train.storage_path``); returns
    that folder (None: nothing to move). Under the run's lock: nothing else writes them."""
    order = stage_names()
    later = order if stage == INGEST else order[order.index(stage):]
    names = ([INGEST] if stage == INGEST else []) + list(later)
    folders = {n: cfg.stage_dir(n) for n in names}
    if "train" in later and train_checkpoints and not storage.absolute(
            train_checkpoints).startswith(storage.absolute(cfg.stage_dir("train"))):
        folders["train-checkpoints"] = train_checkpoints
    moving = {n: f for n, f in folders.items() if storage.exists(f)}
    if not moving:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = storage.join(cfg.run.output_dir, ASIDE, stamp)
    for name, folder in moving.items():
        transfer.move_dir(folder, storage.join(aside, name))
        log.warning("--restart %s: moved %s aside to %s", stage, folder,
                    storage.join(aside, name))
    return aside
