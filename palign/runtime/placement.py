"""A stage's resource request (``palign.runtime.resources``) as Ray Data arguments: the actor
pool, each replica's CPUs and GPUs, and for tensor parallelism a placement group per replica,
removed when the stage ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from palign.runtime.resources import TP_STRATEGY, EngineRequest


class PlacementGroupFactory:
    """``ray_remote_args_fn`` for a tensor-parallel pool: each call (Ray Data calls it once per
    actor it starts) makes one placement group of the request's bundles and schedules the actor
    in bundle 0, with child tasks captured so that vLLM's rank actors land in the same group.

    Ray Data never removes these groups; ``remove_all`` does (``engine_pool_kwargs`` calls it
    when the stage ends), otherwise their GPUs stay reserved until the driver exits and the next
    stage could not get them. Until then a replica dropped by autoscaling keeps its group, and
    so does one extra group per execution: Ray Data 2.60's high-memory issue detector calls this
    function once more, after the first actors start, only to read ``memory`` from its result
    (measured in ``tests/integration/test_resources.py``). With ``replicas.min == max`` filling
    the GPUs, that group stays pending and holds nothing. ``ray_remote_args_fn`` is deprecated in
    Ray 2.60 (removal announced for 2.64), though ``ray.data.llm`` still relies on it.
    """

    def __init__(self, bundles: tuple[dict[str, float], ...], strategy: str) -> None:
        self.bundles = [dict(b) for b in bundles]
        self.strategy = strategy
        self.created: list[Any] = []

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group(self.bundles, strategy=self.strategy)
        self.created.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)}

    def remove_all(self) -> int:
        import ray

        removed = 0
        for pg in self.created:
            with contextlib.suppress(Exception):  # already gone with the job
                ray.util.remove_placement_group(pg)
                removed += 1
        self.created.clear()
        return removed


def map_batches_resource_kwargs(request: EngineRequest,
                                batches_per_replica: int = 1) -> dict[str, Any]:
    """``Dataset.map_batches`` keyword arguments for ``request``'s actor pool: ``compute`` (an
    ``ActorPoolStrategy`` of min..max replicas, each running ``batches_per_replica`` batches at
    once on threads), ``num_cpus``, ``num_gpus`` and, with tensor parallelism,
    ``ray_remote_args_fn`` (a ``PlacementGroupFactory``; prefer ``engine_pool_kwargs``, which
    also removes its placement groups)."""
    import ray

    concurrent: dict[str, Any] = {}
    if batches_per_replica > 1:
        concurrent = {"max_concurrent_calls_per_actor": batches_per_replica,
                      "enable_true_multi_threading": True}
    kwargs: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(min_size=request.min_replicas,
                                              max_size=request.max_replicas, **concurrent),
        "num_cpus": request.num_cpus,
        "num_gpus": request.num_gpus,
    }
    if request.bundles:
        kwargs["ray_remote_args_fn"] = PlacementGroupFactory(request.bundles,
                                                             request.strategy or TP_STRATEGY)
    return kwargs


@contextlib.contextmanager
def engine_pool_kwargs(request: EngineRequest,
                       batches_per_replica: int = 1) -> Iterator[dict[str, Any]]:
    """``map_batches_resource_kwargs`` for the duration of a stage; on exit the placement groups
    made for its replicas are removed (consume the dataset inside the ``with``)."""
    kwargs = map_batches_resource_kwargs(request, batches_per_replica)
    try:
        yield kwargs
    finally:
        factory = kwargs.get("ray_remote_args_fn")
        if isinstance(factory, PlacementGroupFactory):
            factory.remove_all()


def batches_per_replica(max_in_flight: int, batch_size: int) -> int:
    """Ray Data batches one engine replica runs at once: enough to keep ``max_in_flight``
    requests in the engine when each batch's rows are one request each."""
    return max(1, -(-max_in_flight // batch_size))
