"""``engine.backend`` by import path (``package.module:Class``): the class is imported before
any work (``palign validate`` and every run), a path that does not import fails naming the
stage's field, and the class is built from the stage's EngineSpec and served like vLLM or
transformers. The faulty engine of test_faults.py comes in this way."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from palign.cli import main as palign_main
from palign.config import EngineConfig, parse_config
from palign.engines import EngineSpec, build_engine
from palign.engines.base import BackendBase, Chat, Completion, LabelScores, Sampling
from palign.engines.guard import GuardedEngine
from palign.engines.server import EngineServer
from palign.preflight import check_engine_kwargs

NOT_A_CLASS = "a backend must be a class"


class Echo(BackendBase):
    """A backend driven in batches that says back the last message it was sent."""

    name = "echo"

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        return [Completion(text=chat[-1]["content"]) for chat in chats]

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        return [LabelScores(logprobs=dict.fromkeys(labels, -1.0)) for _ in chats]


class Half:
    """Answers generate only: not a Backend."""

    name = "half"

    def __init__(self, spec: EngineSpec) -> None:
        pass

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        return [Completion() for _ in chats]


def validate(tmp_path, backend: str, capsys) -> tuple[int, str]:
    raw = {"run": {"output_dir": str(tmp_path / "out"), "stages": ["truncate"]},
           "data": {"path": str(tmp_path / "data.jsonl")},
           "models": {"student": "smollm2-135m"},
           "truncate": {"engine": {"backend": backend}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = palign_main(["validate", "--skip-paths", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("backend", "why"), [
    ("no_such_module_palign:Engine", "truncate.engine.backend: cannot import "
                                     "'no_such_module_palign' (ModuleNotFoundError"),
    ("test_engine_backends:Missing", "truncate.engine.backend: module 'test_engine_backends' "
                                     "has no 'Missing'"),
    ("test_engine_backends:NOT_A_CLASS", "truncate.engine.backend: "
                                         "'test_engine_backends:NOT_A_CLASS' is not a class"),
    ("tgi", "truncate.engine.backend: Value error, use auto, vllm, transformers, openai or a "
            "class by import path (package.module:Class), not 'tgi'"),
])
def test_a_bad_backend_fails_validation_naming_the_field(tmp_path, capsys, backend, why):
    code, err = validate(tmp_path, backend, capsys)
    assert code == 2
    assert why in err


def test_a_backend_path_that_imports_validates(tmp_path, capsys):
    code, err = validate(tmp_path, "test_engine_backends:Echo", capsys)
    assert code == 0, err
    # Its engine_kwargs are its own: not checked against vLLM's arguments.
    cfg = parse_config({"data": {"path": "x.jsonl"}, "models": {"student": "smollm2-135m"},
                        "run": {"stages": ["truncate"]},
                        "truncate": {"engine": {"backend": "test_engine_backends:Echo",
                                                "engine_kwargs": {"echo_volume": 11}}}})
    check_engine_kwargs(cfg)


def test_a_backend_by_path_is_built_from_the_spec_and_served():
    spec = EngineSpec.of(EngineConfig(backend="test_engine_backends:Echo", max_model_len=128),
                         "some/model", seed=5)
    backend = build_engine(spec)
    assert isinstance(backend, Echo)
    assert backend.spec.model == "some/model" and backend.spec.max_model_len == 128
    assert backend.spec.seed == 5
    engine = GuardedEngine(EngineServer(backend, max_in_flight=2), timeout_s=30)
    try:
        chat = [{"role": "user", "content": "hello"}]
        assert engine.generate([chat], Sampling())[0].text == "hello"
        assert asyncio.run(engine.agenerate(chat, Sampling())).text == "hello"
        assert asyncio.run(engine.admit(chat)) == 0  # no KV cache to reserve against
        assert engine.stats()["prompt_tokens"] == 0
    finally:
        engine.close()
    with pytest.raises(TypeError, match="lacks calls of palign.engines.base.Backend"):
        build_engine(spec.model_copy(update={"backend": "test_engine_backends:Half"}))


def test_engine_spec_is_the_engine_section_plus_what_the_run_decides():
    """Every field of EngineConfig reaches the spec as the config has it."""
    engine = EngineConfig(backend="vllm", max_model_len=512, engine_kwargs={"a": 1},
                          vllm_driver="async_llm", enforce_eager=True)
    spec = EngineSpec.of(engine, "m", seed=3, executor_backend="ray",
                         template_kwargs={"enable_thinking": False})
    assert {k: getattr(spec, k) for k in EngineConfig.model_fields} == dict(engine)
    assert (spec.model, spec.seed, spec.executor_backend) == ("m", 3, "ray")
    assert spec.chat_template_kwargs == {"enable_thinking": False}
