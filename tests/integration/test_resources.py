"""Config -> Ray resource requests (pure), and one slow check that the tensor-parallel placement
groups schedule a Ray Data actor and its rank actors as planned (on fake GPUs)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from palign.config import ConfigError, EngineConfig, load_config, parse_config
from palign.runtime.placement import PlacementGroupFactory, map_batches_resource_kwargs
from palign.runtime.resources import (
    TP_STRATEGY,
    ResourceError,
    ResourcePlan,
    engine_request,
    engine_stages,
    format_resource_plan,
    plan_engines,
    plan_resources,
    train_request,
)

ROOT = Path(__file__).resolve().parents[2]


def gpu_config(**sections: Any) -> Any:
    raw: dict[str, Any] = {
        "run": {"stages": ["generate", "truncate", "align", "train"]},
        "data": {"path": "problems.jsonl"},
        "models": {"student": "student", "teacher": "teacher"},
        "engine": {"gpus_per_replica": 1, "cpus_per_replica": 4, "replicas": {"min": 1, "max": 8}},
        "train": {"num_workers": 16, "use_gpu": True, "cpus_per_worker": 6},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def test_demo_config_asks_for_no_gpu() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    plan = plan_resources(cfg)
    assert [r.stage for r in plan.engines] == ["generate", "truncate", "align"]
    for r in plan.engines:
        assert (r.num_cpus, r.num_gpus, r.bundles, r.strategy) == (2, 0, (), None)
        assert (r.min_replicas, r.max_replicas, r.executor_backend) == (1, 1, None)
    assert plan.train is not None
    assert plan.train.scaling_config_kwargs() == {
        "num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}}
    assert (plan.peak_cpus, plan.peak_gpus) == (2, 0)


def test_gpu_replicas_without_tensor_parallelism() -> None:
    plan = plan_resources(gpu_config())
    r = plan.engine("truncate")
    assert (r.num_cpus, r.num_gpus, r.min_replicas, r.max_replicas) == (4, 1, 1, 8)
    assert not r.bundles and r.executor_backend is None
    assert (r.max_cpus, r.max_gpus) == (32, 8)


def test_fractional_gpu_shares_a_gpu_when_memory_allows() -> None:
    r = engine_request("align", EngineConfig(gpus_per_replica=0.5, gpu_memory_utilization=0.45))
    assert (r.num_gpus, r.bundles) == (0.5, ())


def test_tensor_parallel_replica_is_one_strict_pack_group() -> None:
    cfg = gpu_config(generate={"engine": {"gpus_per_replica": 4, "tensor_parallel_size": 4,
                                          "replicas": {"min": 1, "max": 2}}})
    plan = plan_resources(cfg)
    r = plan.engine("generate")
    assert r.num_gpus == 0  # the rank actors hold the GPUs, not the Ray Data actor
    assert r.num_cpus == 4
    assert r.strategy == TP_STRATEGY == "STRICT_PACK"
    assert r.executor_backend == "ray"
    assert r.bundles == ({"GPU": 1, "CPU": 4}, {"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1},
                         {"GPU": 1, "CPU": 1})
    assert (r.cpus_per_replica, r.gpus_per_replica, r.max_cpus, r.max_gpus) == (7, 4, 14, 8)
    assert plan.engine("truncate").bundles == ()  # the other stages keep the defaults
    assert plan.peak_gpus == 16  # train: 16 workers x 1 GPU


def test_default_cpu_tensor_parallel_bundles_match_ray_data_llm() -> None:
    r = engine_request("generate", EngineConfig(gpus_per_replica=2, tensor_parallel_size=2))
    assert r.bundles == ({"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1})


@pytest.mark.parametrize(("stage_engine", "field"), [
    ({"tensor_parallel_size": 2, "gpus_per_replica": 0}, "truncate.engine.tensor_parallel_size"),
    ({"tensor_parallel_size": 2, "gpus_per_replica": 1.5}, "truncate.engine.gpus_per_replica"),
    ({"tensor_parallel_size": 4, "gpus_per_replica": 2}, "truncate.engine.gpus_per_replica"),
    ({"tensor_parallel_size": 1, "gpus_per_replica": 2}, "truncate.engine.gpus_per_replica"),
    ({"tensor_parallel_size": 2, "gpus_per_replica": 2, "backend": "transformers"},
     "truncate.engine.backend"),
    ({"gpus_per_replica": 0.5, "gpu_memory_utilization": 0.9},
     "truncate.engine.gpu_memory_utilization"),
])
def test_inconsistent_engine_names_the_field(stage_engine: dict, field: str) -> None:
    cfg = gpu_config(truncate={"engine": stage_engine})
    with pytest.raises(ResourceError) as err:
        plan_resources(cfg)
    assert f"  {field}: " in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI reports it like any config error


def test_cpu_demo_with_tensor_parallelism_names_the_stage_field() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      {"truncate.engine.tensor_parallel_size": 2})
    with pytest.raises(ResourceError, match=r"truncate\.engine\.tensor_parallel_size: 2 needs"):
        plan_resources(cfg)


def test_every_problem_is_reported_at_once() -> None:
    cfg = gpu_config(engine={"gpus_per_replica": 0, "tensor_parallel_size": 2})
    with pytest.raises(ResourceError) as err:
        plan_resources(cfg)
    for stage in ("generate", "truncate", "align"):
        assert f"{stage}.engine.tensor_parallel_size" in str(err.value)


def test_local_ray_too_small_to_start_a_stage() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"ray.num_cpus": 1})
    with pytest.raises(ResourceError) as err:
        plan_resources(cfg)
    text = str(err.value)
    assert "generate.engine.cpus_per_replica: a replica needs 2 CPUs" in text
    assert "train.num_workers: 2 workers x 1 CPUs need 2" in text
    # A cluster (address set) is not checked: its size is not in the config.
    plan_resources(load_config(ROOT / "configs" / "demo.yaml",
                               {"ray.num_cpus": 1, "ray.address": "auto"}))


def test_min_replicas_over_local_ray() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      {"ray.num_cpus": 3, "align.engine.replicas": {"min": 2, "max": 2}})
    with pytest.raises(ResourceError, match=r"align\.engine\.replicas\.min: 2 replicas need 4"):
        plan_resources(cfg)


def test_train_gpu_workers() -> None:
    cfg = gpu_config()
    t = train_request(cfg.train)
    assert t.scaling_config_kwargs() == {
        "num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 6, "GPU": 1}}
    assert (t.max_cpus, t.max_gpus) == (96, 16)


def test_stages_without_engines_are_left_out() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      {"truncate.strategy": "full", "run.stages": ["truncate", "align"]})
    plan = plan_resources(cfg)
    assert [r.stage for r in plan.engines] == ["align"]
    assert plan.train is None
    with pytest.raises(KeyError):
        plan.engine("truncate")


def test_any_stage_with_an_engine_section_counts() -> None:
    # A stage the config does not know yet (evaluate): anything with an `engine` section.
    cfg = SimpleNamespace(run=SimpleNamespace(stages=["align", "evaluate", "train"]),
                          align=SimpleNamespace(engine=EngineConfig()),
                          evaluate=SimpleNamespace(engine=EngineConfig(gpus_per_replica=1)),
                          train=SimpleNamespace(num_workers=1))
    pairs = engine_stages(cfg, needs_engine=lambda c, s: True)  # type: ignore[arg-type]
    assert [s for s, _ in pairs] == ["align", "evaluate"]
    assert plan_engines(pairs)[1].num_gpus == 1
    assert engine_stages(cfg, lambda c, s: s != "align") == pairs[1:]  # type: ignore[arg-type]


def test_format_shows_the_numbers() -> None:
    cfg = gpu_config(generate={"engine": {"gpus_per_replica": 4, "tensor_parallel_size": 4,
                                          "replicas": {"min": 2, "max": 2}}})
    text = format_resource_plan(plan_resources(cfg))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "replicas", "CPU"]
    gen = next(line for line in lines if line.startswith("generate"))
    assert gen.split()[:6] == ["generate", "2..2", "7", "4", "14", "8"]
    assert gen.endswith("{GPU: 1, CPU: 4} + 3 x {GPU: 1, CPU: 1} STRICT_PACK (actor in bundle 0)")
    trunc = next(line for line in lines if line.startswith("truncate"))
    assert trunc.split() == ["truncate", "1..8", "4", "1", "32", "8", "-"]
    train = next(line for line in lines if line.startswith("train"))
    assert train.split() == ["train", "16", "6", "1", "96", "16", "-"]
    assert lines[-1] == "peak (stages run one at a time): 96 CPUs, 16 GPUs"


def test_map_batches_kwargs() -> None:
    plain = map_batches_resource_kwargs(engine_request("align", EngineConfig(cpus_per_replica=2)))
    assert (plain["num_cpus"], plain["num_gpus"]) == (2, 0)
    assert (plain["compute"].min_size, plain["compute"].max_size) == (1, 1)
    assert "ray_remote_args_fn" not in plain
    tp = map_batches_resource_kwargs(engine_request(
        "align", EngineConfig(gpus_per_replica=2, tensor_parallel_size=2,
                              replicas={"min": 2, "max": 3})))
    assert (tp["num_cpus"], tp["num_gpus"]) == (1, 0)
    assert (tp["compute"].min_size, tp["compute"].max_size) == (2, 3)
    factory = tp["ray_remote_args_fn"]
    assert isinstance(factory, PlacementGroupFactory)
    assert (factory.bundles, factory.strategy) == ([{"GPU": 1, "CPU": 1}] * 2, "STRICT_PACK")


def _report_placement_class() -> type:
    """A stand-in for StageWorker, made inside a function so that Ray ships the class by value
    (tests/ is not importable on the workers)."""

    class ReportPlacement:
        """Reports its placement group and what it holds itself, and runs one 'rank' per bundle
        the way vLLM's Ray executor places its rank actors (num_cpus=0, num_gpus=1, bundle i)."""

        def __init__(self) -> None:
            import ray
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            pg = ray.util.get_current_placement_group()
            own = ray.get_runtime_context().get_assigned_resources()

            @ray.remote(num_cpus=0, num_gpus=1)
            def rank() -> list[int]:
                return [int(i) for i in ray.get_gpu_ids()]

            ranks = ray.get([
                rank.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i)).remote()
                for i in range(len(pg.bundle_specs))])
            self.report = json.dumps({"pg": pg.id.hex(), "bundles": pg.bundle_specs, "own": own,
                                      "ranks": ranks})

        def __call__(self, batch: dict) -> dict:
            return {"id": batch["id"], "report": [self.report] * len(batch["id"])}

    return ReportPlacement


@pytest.mark.ray
def test_tensor_parallel_pool_runs_in_its_placement_group(no_ray) -> None:
    import ray

    from palign.runtime.placement import engine_pool_kwargs

    # Fake GPUs: Ray schedules on logical counts; the third CPU is for Ray Data's own tasks.
    ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        request = engine_request("truncate", EngineConfig(gpus_per_replica=2,
                                                          tensor_parallel_size=2))
        ds = ray.data.from_items([{"id": str(i)} for i in range(4)])
        with engine_pool_kwargs(request) as kwargs:
            rows = ds.map_batches(_report_placement_class(), batch_size=2, **kwargs).take_all()
            # One group per actor start, plus the one Ray Data's high-memory issue detector
            # makes when it reads the remote args at the start of the execution (never used).
            created = [pg.id.hex() for pg in kwargs["ray_remote_args_fn"].created]
            assert 1 <= len(created) <= 2
        reports = {r["report"] for r in rows}
        assert len(reports) == 1  # one replica served every batch
        report = json.loads(reports.pop())
        assert report["pg"] in created
        assert report["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 2
        assert report["own"].get("GPU", 0) == 0 and report["own"]["CPU"] == 1
        assert sorted(sum(report["ranks"], [])) == [0, 1]  # one GPU per rank, both in the group
        table = ray.util.placement_group_table()
        assert {table[pg]["state"] for pg in created} == {"REMOVED"}  # given back at the end
    finally:
        ray.shutdown()


def test_autoscaling_tensor_parallel_pool_gets_a_note() -> None:
    cfg = gpu_config(align={"engine": {"gpus_per_replica": 2, "tensor_parallel_size": 2,
                                       "replicas": {"min": 1, "max": 3}}})
    plan = plan_resources(cfg)
    assert len(plan.notes) == 1 and plan.notes[0].startswith("align.engine.replicas: ")
    assert format_resource_plan(plan).splitlines()[-1] == f"note: {plan.notes[0]}"
    assert plan_resources(gpu_config()).notes == ()


def test_format_keeps_the_run_order() -> None:
    pairs = [("align", EngineConfig()), ("evaluate", EngineConfig(gpus_per_replica=1))]
    plan = ResourcePlan(plan_engines(pairs), train_request(gpu_config().train),
                        order=("align", "train", "evaluate"))
    rows = [line.split()[0] for line in format_resource_plan(plan).splitlines()[1:4]]
    assert rows == ["align", "train", "evaluate"]
    assert ResourcePlan(plan_engines(pairs)).stages() == ["align", "evaluate"]
