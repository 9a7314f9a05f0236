"""What each stage asks Ray for: the mapping from the config to resource requests.

``plan_resources(cfg)`` is pure (no Ray): it turns every listed stage that runs an engine into an
``EngineRequest`` (one Ray Data actor per replica, ``replicas.min..max`` of them) and the train
stage into a ``TrainRequest`` (Ray Train workers), and rejects inconsistent settings with the
dotted path of the field, as config errors do. ``format_resource_plan`` prints it as a table.
``palign.runtime.placement`` turns a request into ``Dataset.map_batches`` arguments (actor
pools, placement groups).

Engine replicas, by ``<stage>.engine``:

- CPU (``gpus_per_replica: 0``): the actor asks for ``cpus_per_replica`` CPUs and no GPU;
  ``tensor_parallel_size`` must be 1.
- One GPU (``tensor_parallel_size: 1``): the actor asks for ``cpus_per_replica`` CPUs and
  ``gpus_per_replica`` GPUs, at most 1 (a fraction shares a GPU between replicas; then vLLM's
  ``gpu_memory_utilization`` must not exceed that fraction, or the second replica finds no
  memory).
- Tensor parallel (``tensor_parallel_size: tp > 1``): ``gpus_per_replica`` counts all the GPUs
  of a replica and must equal ``tp`` (one whole GPU per rank). vLLM then runs its ranks as Ray
  actors (``distributed_executor_backend="ray"``, which each request one GPU and no CPU) inside
  the placement group of the Ray Data actor that owns the engine. So that actor asks Ray Data
  for no GPU at all; instead, each time Ray Data starts one, a placement group of ``tp`` bundles
  ``{"GPU": 1, "CPU": 1}`` (bundle 0: ``{"GPU": 1, "CPU": cpus_per_replica}``, where the actor
  itself runs) is created with strategy ``STRICT_PACK``: all ranks on one node, since tensor
  parallelism exchanges activations every layer and wants NVLink, not the network. This is the
  approach of Ray's own ``ray.data.llm`` vLLM stage (2.60), which uses ``PACK``; a replica that
  cannot fit on one node should fail to schedule, not spread silently.

Stages run one after another, so the cluster must hold the largest stage at its maximum scale,
not their sum (``ResourcePlan.peak_cpus`` / ``peak_gpus``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from palign.config import Config, ConfigError, EngineConfig, format_problems
from palign.stages import registry
from palign.stages.train import TrainSection

TP_STRATEGY = "STRICT_PACK"  # every tensor-parallel rank of a replica on one node
TP_EXECUTOR_BACKEND = "ray"  # vLLM's executor for tp > 1: ranks as Ray actors in our bundles


class ResourceError(ConfigError):
    """Resource settings that cannot run together; the message names each offending field."""


@dataclass(frozen=True)
class EngineRequest:
    """One engine stage's actor pool. ``num_cpus``/``num_gpus`` are what the Ray Data actor
    itself requests; with ``bundles`` (tensor parallelism) each replica also reserves a
    placement group of those bundles, and the actor runs in bundle 0."""

    stage: str
    min_replicas: int
    max_replicas: int
    num_cpus: float
    num_gpus: float
    tensor_parallel_size: int = 1
    bundles: tuple[dict[str, float], ...] = ()
    strategy: str | None = None  # the placement group strategy when there are bundles
    executor_backend: str | None = None  # vLLM distributed_executor_backend; None: its default

    @property
    def cpus_per_replica(self) -> float:
        """CPUs a replica holds (its bundles' when it has a placement group: the actor's CPUs
        come out of bundle 0)."""
        if self.bundles:
            return sum(b.get("CPU", 0.0) for b in self.bundles)
        return self.num_cpus

    @property
    def gpus_per_replica(self) -> float:
        if self.bundles:
            return sum(b.get("GPU", 0.0) for b in self.bundles)
        return self.num_gpus

    @property
    def max_cpus(self) -> float:
        return self.max_replicas * self.cpus_per_replica

    @property
    def max_gpus(self) -> float:
        return self.max_replicas * self.gpus_per_replica


@dataclass(frozen=True)
class TrainRequest:
    """The train stage's Ray Train workers, as ``ScalingConfig`` takes them."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def scaling_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ray.train.ScalingConfig``."""
        return {"num_workers": self.num_workers, "use_gpu": self.use_gpu,
                "resources_per_worker": dict(self.resources_per_worker)}

    @property
    def max_cpus(self) -> float:
        return self.num_workers * self.resources_per_worker.get("CPU", 0.0)

    @property
    def max_gpus(self) -> float:
        return self.num_workers * self.resources_per_worker.get("GPU", 0.0)


@dataclass(frozen=True)
class ResourcePlan:
    engines: tuple[EngineRequest, ...] = ()
    train: TrainRequest | None = None
    notes: tuple[str, ...] = ()  # settings that run, but not as well as they could
    order: tuple[str, ...] = ()  # the planned stages in run order (default: engines, train)

    def stages(self) -> list[str]:
        default = [r.stage for r in self.engines] + (["train"] if self.train else [])
        return list(self.order) or default

    def engine(self, stage: str) -> EngineRequest:
        for request in self.engines:
            if request.stage == stage:
                return request
        raise KeyError(f"no engine request for stage {stage!r}")

    @property
    def peak_cpus(self) -> float:
        """CPUs the busiest stage holds at maximum scale (stages run one at a time)."""
        return max((c for c, _ in self._totals()), default=0.0)

    @property
    def peak_gpus(self) -> float:
        return max((g for _, g in self._totals()), default=0.0)

    def _totals(self) -> list[tuple[float, float]]:
        totals = [(r.max_cpus, r.max_gpus) for r in self.engines]
        if self.train is not None:
            totals.append((self.train.max_cpus, self.train.max_gpus))
        return totals


# ------------------------------------------------------------------------------ pure mapping


def engine_problems(stage: str, engine: EngineConfig) -> list[str]:
    """Every inconsistency in one stage's engine settings, as ``"<dotted path>: <why>"``."""
    path = f"{stage}.engine"
    tp, gpus = engine.tensor_parallel_size, engine.gpus_per_replica
    problems = []
    if engine.is_remote() and (gpus or tp > 1):  # its actors hold HTTP sessions, no model
        return [f"{path}.gpus_per_replica: a remote engine (backend {engine.backend}) runs on "
                "CPU workers: set gpus_per_replica to 0 and tensor_parallel_size to 1"]
    if tp > 1:
        if gpus == 0:
            problems.append(f"{path}.tensor_parallel_size: {tp} needs GPUs, and "
                            f"{path}.gpus_per_replica is 0 (CPU); use 1 on CPU or give each "
                            f"replica {tp} GPUs")
        elif gpus != int(gpus):
            problems.append(f"{path}.gpus_per_replica: {gpus:g} with tensor_parallel_size {tp}: "
                            f"each rank takes one whole GPU, so set it to {tp}")
        elif gpus != tp:
            problems.append(f"{path}.gpus_per_replica: {gpus:g} GPUs for tensor_parallel_size "
                            f"{tp}: one GPU per rank, so set it to {tp}")
        if engine.backend == "transformers":
            problems.append(f"{path}.backend: the transformers engine has no tensor "
                            f"parallelism; use vllm (or auto), or tensor_parallel_size 1")
    elif gpus > 1:
        problems.append(f"{path}.gpus_per_replica: {gpus:g} GPUs for one engine without tensor "
                        "parallelism, which uses one: set it to 1 (a fraction shares a GPU), or "
                        f"set tensor_parallel_size to {gpus:g}")
    elif 0 < gpus < 1 and engine.backend != "transformers" \
            and engine.gpu_memory_utilization > gpus:
        problems.append(f"{path}.gpu_memory_utilization: {engine.gpu_memory_utilization:g} of "
                        f"the GPU's memory for a replica that gets {gpus:g} of the GPU; replicas "
                        f"sharing it would not fit: set it to at most {gpus:g}")
    return problems


def _engine_request(stage: str, engine: EngineConfig) -> EngineRequest:
    tp, replicas = engine.tensor_parallel_size, engine.replicas
    if tp == 1:
        return EngineRequest(stage, replicas.min, replicas.max, num_cpus=engine.cpus_per_replica,
                             num_gpus=engine.gpus_per_replica)
    # The actor's CPUs come from bundle 0, where it runs; every other rank's worker process
    # gets one CPU reserved (vLLM's rank actors ask for none, but they do use a core).
    bundles = ({"GPU": 1.0, "CPU": float(engine.cpus_per_replica)},
               *({"GPU": 1.0, "CPU": 1.0} for _ in range(tp - 1)))
    return EngineRequest(stage, replicas.min, replicas.max, num_cpus=engine.cpus_per_replica,
                         num_gpus=0.0, tensor_parallel_size=tp, bundles=bundles,
                         strategy=TP_STRATEGY, executor_backend=TP_EXECUTOR_BACKEND)


def engine_request(stage: str, engine: EngineConfig) -> EngineRequest:
    """The actor pool of one engine stage; raises ``ResourceError`` naming the bad fields."""
    problems = engine_problems(stage, engine)
    if problems:
        raise ResourceError(format_problems(problems))
    return _engine_request(stage, engine)


def train_request(train: TrainSection) -> TrainRequest:
    """Ray Train workers: ``cpus_per_worker`` CPUs each, plus one GPU each with ``use_gpu``."""
    resources: dict[str, float] = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    return TrainRequest(train.num_workers, train.use_gpu, resources)


def _definition_needs_engine(cfg: Config, stage: str) -> bool:
    return registry.get(stage).needs_engine(cfg)


def engine_stages(cfg: Config,
                  needs_engine: Callable[[Config, str], bool] | None = None
                  ) -> list[tuple[str, EngineConfig]]:
    """(stage, engine settings) of every listed stage that runs an engine, in run order.

    A stage counts when its config section has an ``engine`` and ``needs_engine(cfg, stage)``
    says so (default: the stage's definition, ``palign.stages.registry``; e.g. ``truncate``
    with strategy ``full`` runs none).
    """
    if needs_engine is None:
        needs_engine = _definition_needs_engine
    pairs = []
    for stage in cfg.run.stages:
        engine = getattr(getattr(cfg, stage, None), "engine", None)
        if isinstance(engine, EngineConfig) and needs_engine(cfg, stage):
            pairs.append((stage, engine))
    return pairs


def plan_engines(pairs: Iterable[tuple[str, EngineConfig]]) -> tuple[EngineRequest, ...]:
    """Requests for (stage, engine settings) pairs; every problem of every stage in one error."""
    pairs = list(pairs)
    problems = [p for stage, engine in pairs for p in engine_problems(stage, engine)]
    if problems:
        raise ResourceError(format_problems(problems))
    return tuple(_engine_request(stage, engine) for stage, engine in pairs)


def plan_resources(cfg: Config,
                   needs_engine: Callable[[Config, str], bool] | None = None) -> ResourcePlan:
    """Everything ``cfg``'s listed stages ask Ray for. Raises ``ResourceError`` (a
    ``ConfigError``) listing every inconsistent field, including a local Ray
    (``ray.address: null``) with ``ray.num_cpus`` too small for a stage's minimum scale."""
    engines = plan_engines(engine_stages(cfg, needs_engine))  # raises on any engine problem
    train = train_request(cfg.train) if "train" in cfg.run.stages else None
    problems = _local_cluster_problems(cfg, engines, train)
    if problems:
        raise ResourceError(format_problems(problems))
    planned = {r.stage for r in engines} | ({"train"} if train else set())
    return ResourcePlan(engines, train, tuple(n for r in engines for n in _notes(r)),
                        tuple(s for s in cfg.run.stages if s in planned))


def _notes(r: EngineRequest) -> list[str]:
    if r.bundles and r.min_replicas < r.max_replicas:
        # Ray Data does not remove the placement groups it schedules actors into; ours are
        # removed when the stage ends, so a replica dropped earlier keeps its GPUs reserved.
        return [f"{r.stage}.engine.replicas: with tensor parallelism a replica's GPUs stay "
                f"reserved until the stage ends even when the pool scales down; "
                f"min = max ({r.max_replicas}) uses them best"]
    return []


def _local_cluster_problems(cfg: Config, engines: tuple[EngineRequest, ...],
                            train: TrainRequest | None) -> list[str]:
    """A local Ray of ``ray.num_cpus`` CPUs that cannot start a stage would wait forever."""
    have = cfg.ray.num_cpus
    if cfg.ray.address is not None or have is None:
        return []
    problems = []
    for r in engines:
        need_one, need_min = r.cpus_per_replica, r.min_replicas * r.cpus_per_replica
        if need_one > have:
            problems.append(f"{r.stage}.engine.cpus_per_replica: a replica needs {need_one:g} "
                            f"CPUs, and the local Ray has ray.num_cpus = {have}")
        elif need_min > have:
            problems.append(f"{r.stage}.engine.replicas.min: {r.min_replicas} replicas need "
                            f"{need_min:g} CPUs, and the local Ray has ray.num_cpus = {have}")
    if train is not None and train.max_cpus > have:
        problems.append(f"train.num_workers: {train.num_workers} workers x "
                        f"{train.resources_per_worker['CPU']:g} CPUs need {train.max_cpus:g}, "
                        f"and the local Ray has ray.num_cpus = {have}")
    return problems


def format_resource_plan(plan: ResourcePlan) -> str:
    """A short table: per stage, replicas (workers), CPUs and GPUs each, placement bundles and
    the totals at maximum scale; then the peak the cluster must hold."""
    head = f"{'stage':<10}{'replicas':>10}{'CPU each':>10}{'GPU each':>10}{'CPU max':>9}" \
           f"{'GPU max':>9}  placement"
    lines = [head]
    for stage in plan.stages():
        t = plan.train
        if stage == "train" and t is not None:
            lines.append(f"{'train':<10}{t.num_workers:>10}"
                         f"{_num(t.resources_per_worker.get('CPU', 0)):>10}"
                         f"{_num(t.resources_per_worker.get('GPU', 0)):>10}"
                         f"{_num(t.max_cpus):>9}{_num(t.max_gpus):>9}  -")
            continue
        r = plan.engine(stage)
        replicas = f"{r.min_replicas}..{r.max_replicas}"
        place = f"{_bundles_text(r.bundles)} {r.strategy} (actor in bundle 0)" \
            if r.bundles else "-"
        lines.append(f"{r.stage:<10}{replicas:>10}{_num(r.cpus_per_replica):>10}"
                     f"{_num(r.gpus_per_replica):>10}{_num(r.max_cpus):>9}"
                     f"{_num(r.max_gpus):>9}  {place}")
    lines.append(f"peak (stages run one at a time): {_num(plan.peak_cpus)} CPUs, "
                 f"{_num(plan.peak_gpus)} GPUs")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


def _bundle_text(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in bundle.items()) + "}"


def _bundles_text(bundles: tuple[dict[str, float], ...]) -> str:
    """``4 x {GPU: 1, CPU: 1}``, or ``{GPU: 1, CPU: 4} + 3 x {GPU: 1, CPU: 1}``."""
    first, rest = bundles[0], bundles[1:]
    if all(b == first for b in rest):
        return f"{len(bundles)} x {_bundle_text(first)}"
    return f"{_bundle_text(first)} + {len(rest)} x {_bundle_text(rest[0])}"
