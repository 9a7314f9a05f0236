from pathlib import Path

import pytest
import yaml

from palign.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"path": "x.jsonl"}, "models": {"student": "smollm2-135m"}}


def test_demo_config_is_valid():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.run.stages == ["generate", "truncate", "align", "train"]
    assert cfg.train.num_workers == 2 and cfg.train.zero_stage == 2
    assert cfg.judge_model == "smollm2-135m"
    assert cfg.truncate.engine.cpus_per_replica == 2  # inherited from the top-level engine


def errors_of(raw):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    return str(exc.value)


def test_unknown_key_names_its_path():
    msg = errors_of({**MINIMAL, "truncate": {"engine": {"batchsize": 4}}})
    assert "truncate.engine.batchsize" in msg and "Extra inputs" in msg


def test_bad_value_names_its_path():
    assert "truncate.threshold" in errors_of({**MINIMAL, "truncate": {"threshold": 1.5}})
    assert "align.sampling.top_p" in errors_of({**MINIMAL, "align": {"sampling": {"top_p": 0}}})
    assert "truncate.strategy" in errors_of({**MINIMAL, "truncate": {"strategy": "linear"}})
    assert "align.extract" in errors_of({**MINIMAL, "align": {"extract": "loose"}})
    assert "data: Field required" in errors_of({"models": {"student": "m"}})
    assert "data.path" in errors_of({"data": {}, "models": {"student": "m"}})


def test_engine_override_per_stage_and_top_level_errors_name_the_stage():
    cfg = parse_config({**MINIMAL, "engine": {"batch_size": 8, "replicas": {"min": 1, "max": 3}},
                        "align": {"engine": {"batch_size": 2, "replicas": {"max": 2}}}})
    assert cfg.truncate.engine.batch_size == 8
    assert cfg.align.engine.batch_size == 2
    assert (cfg.align.engine.replicas.min, cfg.align.engine.replicas.max) == (1, 2)
    assert "generate.engine.replicas" in errors_of(
        {**MINIMAL, "engine": {"replicas": {"min": 3, "max": 2}}})


def test_stage_order_and_teacher_requirement():
    assert "run.stages" in errors_of({**MINIMAL, "run": {"stages": ["align", "truncate"]}})
    msg = errors_of({"data": {"path": "x", "fields": {"cot": None}}, "models": {"student": "s"}})
    assert "models.teacher" in msg


def test_load_config_overrides_and_unreadable_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(path, {"data.limit": 3}).data.limit == 3
    with pytest.raises(ConfigError, match="data.limit"):
        load_config(path, {"data.limit": -1})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_evaluate_needs_benchmarks_and_folder_safe_unique_names():
    on = {**MINIMAL, "run": {"stages": ["evaluate"]}}
    assert "evaluate.benchmarks" in errors_of(on)
    bench = {"name": "math", "path": "m.jsonl"}
    cfg = parse_config({**on, "evaluate": {"benchmarks": [bench]}})
    assert cfg.evaluate.n == 3 and cfg.evaluate.sampling.temperature == 0.6
    assert cfg.evaluate.sampling.top_p == 0.9
    assert [m.model for m in cfg.evaluate.models] == ["trained"]
    assert "evaluate.benchmarks.0.name" in errors_of(
        {**on, "evaluate": {"benchmarks": [{"name": "../up", "path": "m.jsonl"}]}})
    assert "names must be unique" in errors_of(
        {**on, "evaluate": {"benchmarks": [bench, bench]}})
    assert "evaluate.engine.batchsize" in errors_of(
        {**on, "evaluate": {"benchmarks": [bench], "engine": {"batchsize": 2}}})


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        **MINIMAL, "run": {"name": "base", "stages": ["generate", "truncate"]},
        "truncate": {"strategy": "fixed_ratio", "ratio": 0.5},
    }))
    (tmp_path / "sub" / "arm.yaml").write_text(yaml.safe_dump({
        "extends": "../base.yaml", "run": {"stages": ["truncate"]}, "truncate": {"ratio": 0.25},
    }))
    cfg = load_config(tmp_path / "sub" / "arm.yaml", {"run.name": "x"})
    assert cfg.run.name == "x" and cfg.run.stages == ["truncate"]
    assert cfg.truncate.strategy == "fixed_ratio" and cfg.truncate.ratio == 0.25
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("scale", ["demo", "cluster"])
def test_arm_configs_differ_only_in_name_and_truncation(scale):
    arms = {a: load_config(ROOT / "configs/arms" / scale / f"{a}.yaml")
            for a in ("full_cot", "fixed_ratio", "palign")}
    assert {a: c.truncate.strategy for a, c in arms.items()} == {
        "full_cot": "full", "fixed_ratio": "fixed_ratio", "palign": "binary"}
    assert arms["fixed_ratio"].truncate.ratio == 0.25
    dumps = []
    for c in arms.values():
        d = c.model_dump(mode="json")
        d.pop("run")
        d["truncate"].pop("strategy")
        dumps.append(d)
    assert dumps[0] == dumps[1] == dumps[2]
    assert len({c.run.output_dir for c in arms.values()}) == 3
    shared = load_config(ROOT / "configs/arms" / scale / "shared.yaml")
    assert shared.run.stages == ["generate", "evaluate"]
    assert all(c.data.path == f"{shared.run.output_dir}/generate" for c in arms.values())


def test_failure_settings_are_checked_by_name():
    cfg = parse_config(MINIMAL)
    assert cfg.run.retry_rejects == "system" and cfg.truncate.max_reject_share == 0.5
    assert cfg.align.max_row_attempts == 3 and cfg.engine.max_failures == 3
    assert cfg.evaluate.engine.max_failures == 3  # per stage, from the top-level engine
    assert "run.retry_rejects" in errors_of({**MINIMAL, "run": {"retry_rejects": "sometimes"}})
    assert "truncate.max_reject_share" in errors_of({**MINIMAL,
                                                     "truncate": {"max_reject_share": 1.5}})
    assert "align.max_row_attempts" in errors_of({**MINIMAL, "align": {"max_row_attempts": 0}})
    assert "data.max_reject_share" in errors_of({"data": {"path": "x", "max_reject_share": -1},
                                                 "models": {"student": "m"}})


def test_align_extract_defaults_to_strict():
    assert parse_config(MINIMAL).align.extract == "strict"
    assert parse_config({**MINIMAL, "align": {"extract": "flexible"}}).align.extract == "flexible"


def test_gpu_only_attention_is_refused_on_cpu_by_name():
    msg = errors_of({**MINIMAL, "train": {"attention": "flex"}})
    assert "train.attention: flex needs a GPU" in msg
    assert parse_config({**MINIMAL, "train": {"attention": "flex", "use_gpu": True}})
    assert parse_config(MINIMAL).train.attention == "auto"
