"""engine.engine_kwargs: merged per stage, checked by name against the installed vLLM's engine
arguments before any work (palign validate and every run), never one palign sets itself.
(That they reach vLLM is tests/integration/test_engines.py's test_engine_kwargs_reach_vllm.)"""

from __future__ import annotations

import pytest
import yaml

from palign.cli import main as palign_main
from palign.config import ConfigError, parse_config
from palign.preflight import check_engine_kwargs


def config(tmp_path, **sections) -> dict:
    return {"run": {"output_dir": str(tmp_path / "out"), "stages": ["truncate", "align"]},
            "data": {"path": str(tmp_path / "data.jsonl")},
            "models": {"student": "smollm2-135m"}, **sections}


def validate(tmp_path, raw: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = palign_main(["validate", "--skip-paths", str(path)])
    return code, capsys.readouterr().err


def test_engine_kwargs_merge_key_by_key(tmp_path):
    cfg = parse_config(config(
        tmp_path, engine={"engine_kwargs": {"kv_cache_dtype": "auto", "load_format": "auto"}},
        truncate={"engine": {"engine_kwargs": {"max_num_batched_tokens": 4096,
                                               "load_format": "safetensors"}}}))
    assert cfg.truncate.engine.engine_kwargs == {
        "kv_cache_dtype": "auto", "load_format": "safetensors", "max_num_batched_tokens": 4096}
    assert cfg.align.engine.engine_kwargs == {"kv_cache_dtype": "auto", "load_format": "auto"}
    check_engine_kwargs(cfg)  # all four are vLLM engine arguments


def test_real_engine_arguments_validate(tmp_path, capsys):
    raw = config(tmp_path, engine={"backend": "vllm", "engine_kwargs": {
        "kv_cache_dtype": "fp8", "max_num_batched_tokens": 8192, "pipeline_parallel_size": 1,
        "load_format": "safetensors"}})
    code, err = validate(tmp_path, raw, capsys)
    assert code == 0, err


def test_a_misspelt_argument_fails_naming_the_field_and_the_fix(tmp_path, capsys):
    raw = config(tmp_path, align={"engine": {"engine_kwargs": {"kv_cache_dtyp": "fp8"}}})
    code, err = validate(tmp_path, raw, capsys)
    assert code == 2
    assert ("align.engine.engine_kwargs.kv_cache_dtyp: not an engine argument of the installed "
            "vLLM (did you mean kv_cache_dtype?)") in err
    assert "truncate.engine" not in err


@pytest.mark.parametrize(("key", "field"), [("dtype", "engine.dtype"),
                                             ("max_model_len", "engine.max_model_len"),
                                             ("kv_cache_memory_bytes", "engine.cpu_kv_cache_gib")])
def test_an_argument_palign_sets_itself_fails(tmp_path, key, field):
    cfg = parse_config(config(tmp_path, engine={"engine_kwargs": {key: 1}}))
    with pytest.raises(ConfigError, match=f"truncate.engine.engine_kwargs.{key}: set by "
                                          f"palign; use {field}"):
        check_engine_kwargs(cfg)


def test_the_transformers_backend_takes_none(tmp_path):
    cfg = parse_config(config(tmp_path, engine={"backend": "transformers",
                                                "engine_kwargs": {"kv_cache_dtype": "fp8"}}))
    with pytest.raises(ConfigError, match="transformers backend"):
        check_engine_kwargs(cfg)
    check_engine_kwargs(cfg, ["train"])  # only the stages that run are checked
