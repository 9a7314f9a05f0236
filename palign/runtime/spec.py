"""What an engine actor is told: its stage's own config section and the few run settings it reads.

The driver builds a :class:`WorkerSpec` (``WorkerSpec.of``) from the whole config, where the
config has its paths made absolute (``palign.config.paths``), and hands it to the stage's
actor pool; each actor validates only its section, with the stage's own section class
(``Stage.Section``), and never builds a ``Config``. A tool that runs a stage outside the config's
stage list (an audit's probes, a cost plan's sample) builds one with ``WorkerSpec.for_tool``:
the class by import path, its section and a folder of the tool's choosing. What Ray ships to
every actor stays small and plain: strings, numbers and the section as JSON.

Training is different: Ray Train's workers (and ``torchrun`` ranks) get the whole config, since
the training loop also runs from a YAML file under ``torchrun`` and its identity
(``palign.train.identity``) reads ``models``, ``data`` and ``train`` together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from palign.config import stage_path
from palign.data import storage
from palign.data.layout import new_token
from palign.engines import is_remote
from palign.engines.revisions import pin
from palign.runtime.resources import engine_request
from palign.stages.base import Stage
from palign.stages.registry import by_path
from palign.stages.registry import get as get_stage

if TYPE_CHECKING:
    from palign.config import Config


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a ``StageWorker`` reads from the run's config."""

    stage: str  # the stage's name
    section: dict[str, Any]  # the stage's config section, as JSON (its engine merged in)
    out_dir: str  # the stage's output folder: an absolute path or a URI
    output_format: str  # output.format: the shards' format
    token: str  # the stage run's: shard names derive from it, and the folder's fence
    # Its class's import path: the actor builds the stage from it, not from its own stage
    # list, which lacks a stage the driver registered (a test's, ``registered``).
    stage_class: str
    model: str | None = None  # the model the engine serves (None: no engine here)
    cache_dir: str | None = None  # models.cache_dir: where short model names are staged
    seed: int = 0  # run.seed: the engine's seed
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # the model's template vars
    executor_backend: str | None = None  # how a replica runs its ranks (the pool's plan)

    @classmethod
    def of(cls, cfg: Config, stage: str, model: str | None = None,
           token: str | None = None) -> WorkerSpec:
        """The spec of ``stage``'s actors serving ``model`` for the stage run ``token`` (a
        fresh token when None), from ``cfg`` as the driver holds it."""
        return cls.for_tool(cfg, stage, stage_path(stage), get_stage(stage).section(cfg), model,
                            cfg.stage_dir(stage), token)

    @classmethod
    def for_tool(cls, cfg: Config, name: str, stage_class: str, section: Any,
                 model: str | None, out_dir: str, token: str | None = None) -> WorkerSpec:
        """The spec of a stage a tool runs (``palign audit``, ``palign plan``) that need not
        be in the config's stage list: the class at ``stage_class`` (``"module:Class"``),
        given its ``section`` (an instance of its ``Section`` class, or that as JSON), serving
        ``model``, writing ``out_dir`` (a folder of the tool's choosing); the run settings
        (shard format, seed, model cache, chat template) come from ``cfg``. A hub id is pinned
        here, once, to the commit its revision is now (``palign.engines.revisions.pin``)."""
        if isinstance(section, dict):  # checked here, not first in every actor
            section = by_path(stage_class).Section.model_validate(section)
        executor, template_kwargs = None, {}
        if model is not None:  # the pool's plan says how a replica runs its ranks
            executor = engine_request(name, section.engine).executor_backend
            template_kwargs = cfg.template_kwargs_for(model)  # by the name as written
            if not is_remote(section.engine.backend):  # a server chooses a remote's weights
                # one commit for every actor, whatever the hub's branch does meanwhile
                model = pin(model)
        return cls(
            stage=name,
            section=section.model_dump(mode="json"),
            out_dir=storage.absolute(out_dir),
            output_format=cfg.output.format,
            token=token or new_token(),
            stage_class=stage_class,
            model=model,
            cache_dir=cfg.models.cache_dir,
            seed=cfg.run.seed,
            template_kwargs=template_kwargs,
            executor_backend=executor,
        )

    def definition(self) -> Stage:
        """The stage, built from its class's import path."""
        return by_path(self.stage_class)

    def validated_section(self) -> Any:
        """The section as its stage's own class (``Stage.Section``) validates it."""
        return self.definition().Section.model_validate(self.section)
