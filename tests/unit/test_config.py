import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from palign import config as config_module
from palign.cli import main as palign_main
from palign.config import (
    REQUIRED,
    ConfigError,
    EngineConfig,
    config_model,
    config_models,
    explain,
    load_config,
    parse_config,
)
from palign.stages.train import TrainSection

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize(("arg", "said"), [
    ("=1", "--set '=1': expected KEY=VALUE"),
    ("data.limit", "--set 'data.limit': expected KEY=VALUE"),
    ("a..b=1", "--set a..b: a path is field names joined by '.'"),
    ("data.=1", "--set data.: a path is field names joined by '.'"),
    ("run.nosuch=1", "--set run.nosuch: run has no field 'nosuch'"),
    ("run.outptu_dir=x", "run has no field 'outptu_dir' (did you mean output_dir?)"),
    ("nosuch=1", "--set nosuch: the config has no field 'nosuch'"),
    ("run.output_dir.x=1", "--set run.output_dir.x: run.output_dir is a value, not a section"),
    ("data.fields.id.x=1", "data.fields.id is a value, not a section"),
    ("evaluate.benchmarks.0.name=x", "evaluate.benchmarks is a list; set it whole"),
    ("data.limit=[1", "--set 'data.limit=[1': data.limit: the value is not valid YAML"),
    ("data.limit=!!python/object/apply:os.getcwd []", "data.limit: the value is not valid YAML"),
    ("data.limit=x", "data.limit: Input should be a valid integer, unable to parse string as "
                     "an integer (set by --set data.limit)"),
])
def test_a_malformed_set_fails_as_a_config_error_naming_it(capsys, monkeypatch, arg, said):
    """``--set``: a path that is empty, has an empty part, names no field, indexes into a value
    or a list, or a value YAML cannot read, fails with exit 2 naming the argument and the
    field, never with a traceback (before: TypeError for run.output_dir.x, a raw YAML error
    for [1, an error about the field it happened to land in for a..b)."""
    monkeypatch.chdir(ROOT)
    assert palign_main(["validate", "configs/demo.yaml", "--set", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid config:\n") and said in err, err
    assert "Traceback" not in err


def test_set_reaches_free_mappings_and_sections_left_empty(tmp_path):
    """What a path may name: a key inside a free mapping (chat_template_kwargs), a field of a
    section the file leaves null (train.lora); a file whose section is not a mapping is named."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"lora": None}}))
    cfg = load_config(path, {"models.chat_template_kwargs.enable_thinking": False,
                             "train.lora.r": 4})
    assert cfg.models.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.train.lora is not None and cfg.train.lora.r == 4
    path.write_text(yaml.safe_dump({**MINIMAL, "run": ["not", "a", "section"]}))
    with pytest.raises(ConfigError, match="--set run.name: run in the config file is a list"):
        load_config(path, {"run.name": "x"})


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


def test_cluster_arm_configs_differ_only_in_name_and_method():
    arms = {a: load_config(ROOT / "configs/arms/cluster" / f"{a}.yaml")
            for a in ("full_cot", "fixed_ratio", "palign")}
    assert {a: c.truncate.strategy for a, c in arms.items()} == {
        "full_cot": "full", "fixed_ratio": "fixed_ratio", "palign": "binary"}
    assert arms["fixed_ratio"].truncate.ratio == 0.25
    # plain SFT trains on the teacher's own text, every row; the others on the student's
    # continuation, filtered by Eq. 9
    assert {a: (c.align.target, c.align.policy) for a, c in arms.items()} == {
        "full_cot": ("teacher", "keep_all"), "fixed_ratio": ("draft", "drop_wrong"),
        "palign": ("draft", "drop_wrong")}
    dumps = []
    for c in arms.values():
        d = c.model_dump(mode="json")
        d.pop("run")
        d["truncate"].pop("strategy")
        d["align"].pop("target")
        d["align"].pop("policy")
        dumps.append(d)
    assert dumps[0] == dumps[1] == dumps[2]
    assert len({c.run.output_dir for c in arms.values()}) == 3
    shared = load_config(ROOT / "configs/arms/cluster/shared.yaml")
    assert shared.run.stages == ["generate", "evaluate"]
    assert all(c.data.path == f"{shared.run.output_dir}/generate" for c in arms.values())
    # the paper's evaluation protocol
    ev = shared.evaluate
    assert [b.name for b in ev.benchmarks] == ["aime24", "aime25", "amc12", "math500"]
    assert (ev.sampling.max_tokens, ev.sampling.repetition_penalty) == (None, 1.05)
    assert ev.engine.max_model_len == 4096 and ev.n == 3


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


def test_truncate_verify_is_off_by_default_and_refused_where_it_cannot_run():
    assert parse_config(MINIMAL).truncate.verify is None  # the paper's method is the default
    on = {"verify": {"samples": 4}}
    cfg = parse_config({**MINIMAL, "truncate": on})
    assert (cfg.truncate.verify.min_pass, cfg.truncate.verify.max_moves) == (0.5, 3)
    assert all(f.description for f in type(cfg.truncate.verify).model_fields.values())
    msg = errors_of({**MINIMAL, "truncate": {**on, "search": "lockstep"}})
    assert "truncate.search: truncate.verify needs per_row, not 'lockstep'" in msg
    assert "truncate.strategy: truncate.verify needs binary" in errors_of(
        {**MINIMAL, "truncate": {**on, "strategy": "full"}})
    assert "models.judge: truncate.verify" in errors_of(
        {**MINIMAL, "models": {"student": "s", "judge": "j"}, "truncate": on})
    parse_config({**MINIMAL, "models": {"student": "s", "judge": "s"}, "truncate": on})
    # a run that does not execute truncate leaves its verify unchecked
    parse_config({**MINIMAL, "run": {"stages": ["align"]}, "truncate": {**on, "search": "lockstep"},
                  "models": {"student": "s", "judge": "j"}})
    assert "truncate.verify.min_pass" in errors_of({**MINIMAL, "truncate": {"verify": {
        "min_pass": 0}}})
    assert "truncate.verify.samples" in errors_of({**MINIMAL, "truncate": {"verify": {
        "samples": 0}}})
    # the rollouts' budget must leave room for a prompt, as any generation's
    assert "truncate.verify.sampling.max_tokens: 1024 new tokens" in errors_of(
        {**MINIMAL, "engine": {"max_model_len": 512}, "run": {"stages": ["truncate"]},
         "truncate": on})


def all_config_models() -> list[type[BaseModel]]:
    """Every model reachable from Config, and any other model the config package's modules
    define."""
    modules = [importlib.import_module(f"{config_module.__name__}.{m.name}")
               for m in pkgutil.iter_modules(config_module.__path__)]
    defined = [c for module in modules for c in vars(module).values() if inspect.isclass(c)
               and issubclass(c, BaseModel) and c.__module__ == module.__name__]
    models = config_models()
    return models + [c for c in defined if c not in models]


def test_every_config_field_has_a_description():
    models = all_config_models()
    assert config_model() in models and TrainSection in models and len(models) >= 15
    missing = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_explain_lists_every_field_with_value_and_the_default_where_it_sits():
    cfg = load_config(ROOT / "configs" / "paper" / "demo" / "base.yaml")
    rows = {row.path: row for row in explain(cfg)}
    seq_len = rows["train.seq_len"]
    assert seq_len.value == cfg.train.seq_len and seq_len.default == 4096
    assert seq_len.description == TrainSection.model_fields["seq_len"].description
    assert rows["data.path"].default is REQUIRED
    assert rows["train"].section and not rows["train.seq_len"].section
    # the default of the default generate.sampling, not of SamplingConfig
    assert rows["generate.sampling.repetition_penalty"].default == 1.0
    assert rows["align.sampling.repetition_penalty"].default == 1.05
    assert rows["evaluate.benchmarks[].name"].value == [b.name for b in cfg.evaluate.benchmarks]
    assert rows["evaluate.benchmarks[].fields.id"].default == "id"
    assert rows["evaluate.models"].default == [{"label": "trained", "model": "trained"}]
    leaves = {path for path, row in rows.items() if not row.section}
    assert {"engine.replicas.min", "truncate.engine.max_failures", "output.shard_rows"} <= leaves
    assert all(row.description for row in rows.values())


def test_validate_explain_prints_each_field_with_its_description(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo's data path is relative to the repository
    assert palign_main(["validate", "--explain", "configs/demo.yaml"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line.strip()}
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    for path, value, field in (
        ("train.seq_len", cfg.train.seq_len, TrainSection.model_fields["seq_len"]),
        ("truncate.engine.batch_size", cfg.truncate.engine.batch_size,
         EngineConfig.model_fields["batch_size"]),
    ):
        assert lines[path].startswith(f"{path} = {value} (default: {field.default}) -- ")
        assert lines[path].endswith(field.description)
    assert "config OK" in out


def readme_table_fields() -> dict[str, list[str]]:
    """The README config table: each section's row, and the field names it gives in backticks
    outside parentheses (inside them are values and examples)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| (.*) \|$", line)
        if not m:
            continue
        depth, names = 0, []
        for part in re.split(r"(`[^`]*`|[()])", m.group(2)):
            if part == "(":
                depth += 1
            elif part == ")":
                depth -= 1
            elif part.startswith("`") and depth == 0:
                names.append(part.strip("`"))
        rows[m.group(1)] = names
    return rows


def test_readme_config_table_names_only_fields_that_exist():
    rows = readme_table_fields()
    assert "| `train` |" in (ROOT / "README.md").read_text()
    assert set(rows) == set(config_model().model_fields), "one README row per config section"
    wrong = [f"{section}.{name}" for section, names in rows.items() for name in names
             if name not in config_model().model_fields[section].annotation.model_fields]
    assert not wrong, f"README.md names fields that do not exist: {wrong}"
    assert "seq_len" in rows["train"] and "max_in_flight" in rows["engine"]


def test_an_output_budget_that_leaves_no_room_for_a_prompt_fails_only_where_it_runs():
    small = {**MINIMAL, "engine": {"max_model_len": 256}}
    # generate's default budget (1024) does not fit 256 tokens: a run with generate fails,
    # naming both fields; a run without generate leaves generate's defaults alone
    message = errors_of({**small, "run": {"stages": ["generate", "align"]},
                         "align": {"sampling": {"max_tokens": 64}},
                         "models": {"student": "s", "teacher": "t"}})
    assert "generate.sampling.max_tokens" in message
    assert "generate.engine.max_model_len (256)" in message and "align." not in message
    cfg = parse_config({**small, "run": {"stages": ["align"]},
                        "align": {"sampling": {"max_tokens": 64}}})
    assert cfg.generate.sampling.max_tokens == 1024
    # null means up to the context: always fits
    parse_config({**small, "run": {"stages": ["evaluate"]},
                  "evaluate": {"benchmarks": [{"name": "b", "path": "b.jsonl"}],
                               "sampling": {"max_tokens": None}}})
