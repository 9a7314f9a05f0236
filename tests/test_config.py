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
