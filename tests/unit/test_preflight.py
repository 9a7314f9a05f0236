"""What `palign validate` and every run check before any work: the paths a config names."""

from __future__ import annotations

import json

import pytest

from palign.cli import main as palign_main
from palign.config import ConfigError, parse_config
from palign.data import storage
from palign.preflight import check_paths, path_problems


def config(tmp_path, **over):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1", "cot": "c."}) + "\n")
    raw = {"run": {"output_dir": str(tmp_path / "out"), "stages": ["truncate", "align"]},
           "data": {"path": str(data)}, "models": {"student": "smollm2-135m"}}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def test_a_good_config_has_no_problems(tmp_path):
    assert path_problems(config(tmp_path)) == []


def test_unknown_schemes_and_uris_where_a_path_is_needed_fail_naming_the_field(tmp_path):
    problems = path_problems(config(tmp_path, run={"output_dir": "hdfs://nn/run"},
                                    train={"storage_path": "ftp://host/ckpt"},
                                    models={"cache_dir": "s3://bucket/cache"}))
    assert any(p.startswith("run.output_dir: hdfs://nn/run: hdfs:// is not a supported")
               for p in problems)
    assert any(p.startswith("train.storage_path: ftp://host/ckpt: ftp:// is not a supported")
               for p in problems)
    assert any(p.startswith("models.cache_dir: s3://bucket/cache: this field needs a path")
               for p in problems)


def test_missing_data_models_and_benchmarks_are_named(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    cfg = config(tmp_path, data={"path": str(tmp_path / "missing.jsonl")},
                 models={"student": str(tmp_path / "not-a-model"), "teacher": "./gone",
                         "judge": "smollm2-13m"},
                 run={"stages": ["generate", "truncate", "align", "evaluate"]},
                 evaluate={"benchmarks": [{"name": "b", "path": str(tmp_path / "b.jsonl")}],
                           "models": [{"label": "hub", "model": "Qwen/Qwen2.5-7B-Instruct"}]})
    problems = "\n".join(path_problems(cfg))
    assert "data.path: " in problems and "missing.jsonl does not exist" in problems
    assert "models.student: " in problems and "no config.json" in problems
    assert "models.teacher: ./gone is neither" in problems
    assert "models.judge: smollm2-13m is neither" in problems  # a misspelt short name
    assert "evaluate.benchmarks.0.path: " in problems
    assert "Qwen/Qwen2.5-7B-Instruct" not in problems  # a hub id: only the hub can tell
    with pytest.raises(ConfigError, match="invalid config"):
        check_paths(cfg)


def test_data_is_not_needed_once_ingested_or_by_later_stages(tmp_path):
    cfg = config(tmp_path, data={"path": str(tmp_path / "moved.jsonl")})
    (tmp_path / "out" / "ingest").mkdir(parents=True)
    (tmp_path / "out" / "ingest" / "_DONE").write_text("{}")
    assert path_problems(cfg) == []
    cfg = config(tmp_path, data={"path": "nowhere.jsonl"},
                 run={"stages": ["train"], "output_dir": str(tmp_path / "fresh")})
    assert path_problems(cfg) == []


def test_validate_command_reports_them(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"data": {"path": str(tmp_path / "none.jsonl")},
                                "models": {"student": "smollm2-135m"},
                                "run": {"output_dir": str(tmp_path / "out")}}))
    assert palign_main(["validate", str(path)]) == 2
    assert "data.path: " in capsys.readouterr().err


def test_each_bucket_is_checked_once_and_named_for_every_field(tmp_path, monkeypatch):
    asked = []

    def bucket_problem(location):
        asked.append(location)
        return "cannot reach it: no network"

    monkeypatch.setattr(storage, "bucket_problem", bucket_problem)
    cfg = config(tmp_path, run={"output_dir": "s3://b1/run"}, data={"path": "s3://b1/data"},
                 train={"storage_path": "gs://b1/ckpt"})
    problems = path_problems(cfg)
    assert asked == ["s3://b1/run", "gs://b1/ckpt"]  # one question per bucket (and scheme)
    assert [p.split(":", 1)[0] for p in problems] == ["run.output_dir", "data.path",
                                                      "train.storage_path"]
    assert all(p.endswith("cannot reach it: no network") for p in problems)


def test_validate_can_skip_the_paths_for_a_cluster_config(capsys, monkeypatch):
    from pathlib import Path

    cluster = Path(__file__).resolve().parents[2] / "configs/arms/cluster/palign.yaml"
    # The cluster configs keep everything on a bucket (a placeholder, s3://YOUR-BUCKET); from
    # here it cannot be reached, so validate fails, naming the field and the bucket. An
    # endpoint where nothing listens makes that the same with or without a network.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    storage._filesystem.cache_clear()
    try:
        assert palign_main(["validate", str(cluster)]) == 2
    finally:
        storage._filesystem.cache_clear()
    err = capsys.readouterr().err
    assert "run.output_dir: s3://YOUR-BUCKET/palign/runs/arms/palign: cannot reach it" in err
    assert "data.path: s3://YOUR-BUCKET/palign/runs/arms/shared/generate: " in err
    assert palign_main(["validate", "--skip-paths", str(cluster)]) == 0
    assert "config OK" in capsys.readouterr().out
