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


# --- remote engines (engine.backend: openai) and pinned revisions ----------------------------

REMOTE = {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}


def test_remote_engine_fields_have_defaults_that_work_together():
    cfg = parse_config({**MINIMAL, "generate": {"engine": REMOTE}})
    engine = cfg.generate.engine
    assert engine.is_remote() and not cfg.truncate.engine.is_remote()
    assert (engine.api_key_env, engine.max_concurrency, engine.max_retries) == (None, None, 6)
    assert (engine.retry_backoff_s, engine.retry_backoff_max_s) == (1.0, 60)
    # a trailing "/" is dropped: the engine appends /chat/completions itself
    assert parse_config({**MINIMAL, "generate": {"engine": {
        **REMOTE, "base_url": "https://api.example.com/v1/"}}}).generate.engine.base_url == (
        "https://api.example.com/v1")
    for name in ("base_url", "api_key_env", "max_concurrency", "max_retries",
                 "retry_backoff_s", "retry_backoff_max_s"):
        assert EngineConfig.model_fields[name].description


@pytest.mark.parametrize(("engine", "said"), [
    ({"backend": "openai"}, "generate.engine.base_url: required with backend openai (the "
                            "server's OpenAI-compatible URL, e.g. http://host:8000/v1)"),
    ({**REMOTE, "base_url": "ftp://host/v1"},
     "generate.engine.base_url: an http:// or https:// URL of the OpenAI-compatible API"),
    ({**REMOTE, "base_url": "127.0.0.1:8000/v1"},
     "generate.engine.base_url: an http:// or https:// URL"),
    ({**REMOTE, "base_url": "http://host:notaport/v1"},
     "generate.engine.base_url: an http:// or https:// URL"),
    ({**REMOTE, "base_url": "https://me:sk-secret-1@host/v1"},
     "generate.engine.base_url: holds credentials; put the key in the variable "
     "engine.api_key_env names"),
    ({**REMOTE, "base_url": "https://host/v1?api-key=sk-secret-1"},
     "generate.engine.base_url: a query or fragment has no place here"),
    ({**REMOTE, "api_key_env": "sk-secret-1"},
     "generate.engine.api_key_env: the name of an environment variable (e.g. OPENAI_API_KEY), "
     "not the key itself"),
    ({**REMOTE, "api_key_env": "1KEY"}, "generate.engine.api_key_env: the name of an"),
    ({**REMOTE, "max_concurrency": 0}, "generate.engine.max_concurrency: Input should be "
                                       "greater than or equal to 1"),
    ({**REMOTE, "max_concurrency": 2, "replicas": {"min": 1, "max": 3}},
     "generate.engine.max_concurrency: 2 requests for up to 3 replicas: at least one each"),
    ({**REMOTE, "max_retries": -1}, "generate.engine.max_retries: Input should be greater"),
    ({**REMOTE, "retry_backoff_s": -0.5}, "generate.engine.retry_backoff_s: Input should be"),
    ({**REMOTE, "retry_backoff_s": 5, "retry_backoff_max_s": 2},
     "generate.engine.retry_backoff_max_s: 2.0 s is below retry_backoff_s (5.0 s)"),
    ({"base_url": "http://host/v1"},
     "generate.engine.base_url: only for backend openai (this engine's is auto)"),
    ({"backend": "vllm", "api_key_env": "OPENAI_API_KEY"},
     "generate.engine.api_key_env: only for backend openai (this engine's is vllm)"),
    ({"max_concurrency": 8}, "generate.engine.max_concurrency: only for backend openai"),
])
def test_remote_engine_fields_fail_naming_the_field(engine, said):
    message = errors_of({**MINIMAL, "generate": {"engine": engine}})
    assert said in message, message
    assert "sk-secret-1" not in message  # a key in the wrong field is never echoed


def test_in_flight_and_call_limits_of_local_and_remote_engines():
    cfg = parse_config({**MINIMAL, "engine": {"request_timeout_s": 10, "max_in_flight": 12},
                        "generate": {"engine": {**REMOTE, "max_concurrency": 7,
                                                "replicas": {"min": 1, "max": 3},
                                                "max_retries": 2, "retry_backoff_max_s": 5}}})
    local, remote = cfg.truncate.engine, cfg.generate.engine
    assert (local.in_flight_per_replica(), local.call_limit_s()) == (12, 10)
    # 7 requests over up to 3 replicas: 2 each; every attempt plus the longest waits
    assert remote.in_flight_per_replica() == 2
    assert remote.call_limit_s() == 10 * 3 + 2 * 5
    unbounded = parse_config({**MINIMAL, "engine": {"max_in_flight": 12},
                              "generate": {"engine": REMOTE}}).generate.engine
    assert unbounded.in_flight_per_replica() == 12


def test_only_generate_and_evaluate_may_be_remote():
    from palign.config import stage_class

    assert {n: stage_class(n).remote_engine for n in ("generate", "truncate", "align",
                                                     "evaluate")} == {
        "generate": True, "truncate": False, "align": False, "evaluate": True}
    for stage in ("truncate", "align"):
        message = errors_of({**MINIMAL, stage: {"engine": REMOTE}})
        assert (f"{stage}.engine.backend: openai serves generate and evaluate only: a chat "
                "endpoint gives neither") in message, message
    # the top-level engine reaches every stage, the ones this run skips too: refused by name
    message = errors_of({**MINIMAL, "run": {"stages": ["generate"]}, "engine": REMOTE})
    assert "truncate.engine.backend: openai" in message and "align.engine.backend" in message
    assert "generate.engine.backend" not in message and "evaluate.engine.backend" not in message
    bench = [{"name": "b", "path": "b.jsonl"}]
    parse_config({**MINIMAL, "run": {"stages": ["generate", "evaluate"]},
                  "generate": {"engine": REMOTE},
                  "evaluate": {"engine": REMOTE, "benchmarks": bench,
                               "models": [{"label": "r1", "model": "deepseek-reasoner"}]}})


def test_a_remote_evaluate_names_models_as_the_server_knows_them():
    on = {**MINIMAL, "run": {"stages": ["evaluate"]}}
    bench = [{"name": "b", "path": "b.jsonl"}]
    models = [{"label": "t", "model": "trained"}, {"label": "a", "model": "adapter"},
              {"label": "s", "model": "student"}, {"label": "pinned", "model": "org/m@v1"},
              {"label": "ok", "model": "deepseek-reasoner"}]
    message = errors_of({**on, "evaluate": {"engine": REMOTE, "benchmarks": bench,
                                            "models": models}})
    for i, ref in enumerate(("trained", "adapter", "student")):
        assert (f"evaluate.models.{i}.model: {ref} is a model this run loads from its own "
                "files, which a remote engine (evaluate.engine.backend: openai) cannot serve: "
                "name the model as the server knows it") in message
    assert ("evaluate.models.3.model: a revision (@v1) cannot be pinned on a remote engine "
            "(evaluate.engine.backend: openai): the server chooses the weights") in message
    assert "evaluate.models.4" not in message
    # the same models are fine on a local engine
    parse_config({**on, "evaluate": {"benchmarks": bench, "models": models}})


def test_remote_models_are_not_looked_for_on_disk(tmp_path):
    """Preflight checks the models each stage says it loads: a remote teacher or model under
    test is a name the server knows (deepseek-reasoner), not a folder or hub id here."""
    from palign.preflight import path_problems
    from palign.stages import registry

    (tmp_path / "d.jsonl").write_text('{"id": "1", "question": "q", "answer": "1"}\n')
    raw = {"run": {"stages": ["generate", "evaluate"], "output_dir": str(tmp_path / "out")},
           "data": {"path": str(tmp_path / "d.jsonl"), "fields": {"cot": None}},
           "models": {"student": "smollm2-135m", "teacher": "deepseek-reasoner"},
           "evaluate": {"benchmarks": [{"name": "b", "path": str(tmp_path / "d.jsonl")}],
                        "models": [{"label": "r1", "model": "deepseek-chat"}]}}
    local = parse_config(raw)
    assert registry.get("generate").models_used(local) == [
        ("models.teacher", "deepseek-reasoner")]
    assert any(p.startswith("models.teacher: deepseek-reasoner is neither")
               for p in path_problems(local))
    remote = parse_config({**raw, "generate": {"engine": REMOTE},
                           "evaluate": {**raw["evaluate"], "engine": REMOTE}})
    assert registry.get("generate").models_used(remote) == []
    assert registry.get("evaluate").models_used(remote) == []
    assert path_problems(remote) == []


@pytest.mark.parametrize(("name", "split"), [
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@0123456789abcdef0123456789abcdef01234567",
     ("org/name", "0123456789abcdef0123456789abcdef01234567")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/name", ("org/name", None)),
    ("smollm2-135m@v1", ("smollm2-135m@v1", None)),  # a short name
    ("/models/m@v1", ("/models/m@v1", None)),  # a path
    ("./m/x@v1", ("./m/x@v1", None)),
    ("s3://bucket/m@v1", ("s3://bucket/m@v1", None)),  # a URI
    ("org/name@", ("org/name@", None)),
    ("org/name@bad rev", ("org/name@bad rev", None)),
    ("org/name@" + "a" * 129, ("org/name@" + "a" * 129, None)),
])
def test_split_revision_reads_a_revision_only_on_hub_ids(name, split):
    from palign.common.modelref import split_revision

    assert split_revision(name) == split


def test_a_revision_is_accepted_only_on_hub_ids_naming_the_field():
    cfg = parse_config({**MINIMAL, "models": {"student": "HuggingFaceTB/SmolLM2-135M@main",
                                              "teacher": "org/t@v2", "judge": "org/j@abc123"}})
    assert cfg.models.student == "HuggingFaceTB/SmolLM2-135M@main"  # kept as written
    message = errors_of({**MINIMAL, "models": {"student": "smollm2-135m@v1",
                                               "teacher": "/models/t@v1",
                                               "judge": "org/j@bad rev"}})
    assert "models.student: a revision (@v1) is only for hub ids (org/name@revision)" in message
    assert "models.teacher: a revision (@v1) is only for hub ids" in message
    assert "models.judge: revision 'bad rev' is not a commit, branch or tag name" in message
    bench = [{"name": "b", "path": "b.jsonl"}]
    assert "evaluate.models.0.model: a revision (@x) is only for hub ids" in errors_of(
        {**MINIMAL, "evaluate": {"benchmarks": bench,
                                 "models": [{"label": "m", "model": "./m@x"}]}})
    # a remote teacher is whatever the server serves: a pin there means nothing
    assert ("models.teacher: a revision (@v2) cannot be pinned on a remote engine "
            "(generate.engine.backend: openai): the server chooses the weights") in errors_of(
        {**MINIMAL, "models": {"student": "s", "teacher": "org/t@v2"},
         "generate": {"engine": REMOTE}})


def test_remote_teacher_config_validates(capsys, monkeypatch):
    cfg = load_config(ROOT / "configs" / "remote_teacher.yaml")
    engine = cfg.generate.engine
    assert (engine.backend, engine.base_url, engine.api_key_env) == (
        "openai", "http://127.0.0.1:8000/v1", "OPENAI_API_KEY")
    assert cfg.run.stages == ["generate", "truncate", "align", "train"]  # the demo's
    assert not cfg.truncate.engine.is_remote() and not cfg.align.engine.is_remote()
    monkeypatch.chdir(ROOT)  # the demo's data path is relative to the repository
    monkeypatch.setenv("OPENAI_API_KEY", "sk-made-up-for-validate")
    assert palign_main(["validate", "configs/remote_teacher.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "config OK" in out and "api_key_env: OPENAI_API_KEY" in out
    assert "sk-made-up-for-validate" not in out + err


def test_operational_fields_leave_the_fingerprint():
    """A rerun against another URL, key variable, concurrency or retry policy serving the same
    model resumes; another backend does not (it may write other text)."""
    from palign.data.fingerprint import section_fields

    base = parse_config({**MINIMAL, "generate": {"engine": REMOTE}})
    other = parse_config({**MINIMAL, "generate": {"engine": {
        **REMOTE, "base_url": "https://other.example.com/v1", "api_key_env": "OTHER_KEY",
        "max_concurrency": 3, "max_retries": 1, "retry_backoff_s": 0.05,
        "retry_backoff_max_s": 2}}})
    assert section_fields(base.generate) == section_fields(other.generate)
    assert section_fields(base.generate) != section_fields(
        parse_config({**MINIMAL, "generate": {"engine": {"backend": "vllm"}}}).generate)
    # where train logs its metrics is not what it trains
    train = {"lr": 1e-5, "report_to": ["tensorboard", "mlflow"],
             "tracking": {"experiment": "x", "tensorboard_dir": "/tmp/tb"}}
    assert section_fields(train) == {"lr": 1e-5}
