"""Fixtures shared across test files, and the tiers they put a test in.

The tiers are pytest markers (registered in pyproject.toml): ``ray`` (starts or joins a Ray
cluster), ``model`` (runs a model: SmolLM2's files through palign.engines.models, or a
transformers, vLLM or DeepSpeed model), ``gpu`` (needs CUDA: skipped without it) and ``slow``
(minutes for another reason). A test that uses a fixture below gets that fixture's mark here
(pytest_collection_modifyitems); a file that starts Ray or a model itself says so with
``pytestmark``. ``make test-fast`` runs the tests with none of the marks.

The folders say the same by layer: ``unit/`` holds the files whose tests are all in the fast
tier (pure, or talking to the S3 server at most), ``integration/`` the files that start Ray or a
model (some also hold fast tests: the marks, not the folder, pick the tier), ``e2e/`` the CLI,
submitted Ray jobs and whole pipelines; ``support/`` the helpers and what tests name by import
path."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import s3_server

# tests/support holds what tests name by import path (engine backends, train callbacks, stages):
# on PYTHONPATH here, so every process the tests start (Ray's workers, Ray Train's, torchrun's,
# the CLI's) imports it; palign forwards PYTHONPATH to the workers of a Ray it starts.
SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")
if SUPPORT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (SUPPORT, os.environ.get("PYTHONPATH", "")) if p)

# A made-up API key for the remote-engine tests, in the environment before any Ray starts (a
# local Ray's workers inherit it, as a cluster's nodes hold theirs): the tests look for it in
# every file a run writes and every log line, where it must never be.
OPENAI_KEY_ENV = "PALIGN_TEST_OPENAI_KEY"
os.environ.setdefault(OPENAI_KEY_ENV, "sk-palign-test-" + os.urandom(12).hex())

# The mark a test gets for using a fixture (directly or through another fixture).
FIXTURE_MARKS = {"ray_cluster": "ray", "tiny_model": "model", "tokenizer": "model",
                 "openai_server": "model"}

# vLLM's own OpenAI-compatible server (tests/support/vllm_server.py), once per session: started
# by the first test that asks for it, in the background (its start overlaps that test's work
# until it talks to it), paused whenever no test talks to it (``openai_server.serving()``),
# and stopped after the last test that uses it (an idle vLLM, paused or not, slows the tests
# beside it: see vllm_server), or at the session's end.
_OPENAI_SERVER: dict = {}
OPENAI_SERVER_READY_S = 270  # from its start: within the first user's time limit (300 s)


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


# The one Ray cluster of the suite. Module scope on purpose: the cluster itself lives for the
# session (started on first use, shut down in pytest_sessionfinish), but a module that uses
# no_ray shuts it down, and the next module that asks for ray_cluster must start it again,
# which a session-scoped fixture (set up once) would not.
@pytest.fixture(scope="module")
def ray_cluster():
    """The session's local Ray: 2 CPUs, no dashboard; its workers get the variables palign
    forwards to a local Ray's (PYTHONPATH among them: they import tests/support)."""
    import ray

    from palign.runtime.environment import forwarded_env

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": forwarded_env()})
    yield


@pytest.fixture(scope="module")
def no_ray():
    """For tests that start a Ray of their own (other resources, a `ray start` head) or need
    none at all: the session's Ray is shut down (the next ray_cluster user starts it again).
    A test that starts its own Ray is marked ``ray`` in its file."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """The session's S3-compatible server (``s3_server``): its URL."""
    server, url = s3_server.start()
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """The environment that reaches the session's S3 server (set in this process for the
    module, pyarrow's cached file systems dropped), with bucket ``s3_server.BUCKET`` made."""
    from palign.data import storage

    env = {"AWS_ENDPOINT_URL_S3": s3_endpoint, **s3_server.CREDENTIALS}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystem.cache_clear()
    s3_server.make_bucket(s3_endpoint)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._filesystem.cache_clear()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M's tokenizer and chat template (read only: a test that changes it loads its
    own)."""
    from transformers import AutoTokenizer

    from palign.engines.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-init 2-layer Llama (hidden 64) saved with SmolLM2's tokenizer and template:
    for tests of shapes and plumbing, never of what a model says."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from palign.engines.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def openai_server():
    """vLLM's OpenAI-compatible server on SmolLM2 (``vllm_server.VLLMServer``: ``url`` up to
    /v1, ``MODEL`` the name it serves, ``key_env`` the variable of its ``--api-key``), paused:
    a test talks to it inside ``with openai_server.serving():``."""
    if not _vllm_installed():
        pytest.skip("needs vLLM (its OpenAI-compatible server); the vllm package is not "
                    "installed here")
    import vllm_server

    server = _OPENAI_SERVER["vllm"] = vllm_server.VLLMServer(OPENAI_KEY_ENV)
    yield server.start_paused(OPENAI_SERVER_READY_S)
    server.stop()  # at the session's end, if the last user's teardown did not


def pytest_runtest_teardown(item, nextitem):
    server = _OPENAI_SERVER.get("vllm")
    if server is not None and item.nodeid == _OPENAI_SERVER.get("last_user"):
        server.stop()  # no test after this one talks to it


def pytest_terminal_summary(terminalreporter):
    server = _OPENAI_SERVER.get("vllm")
    if server is not None and server.ready_s is not None:
        terminalreporter.write_line(
            f"vLLM's OpenAI server: answered {server.ready_s:.1f} s after its start")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            if name in FIXTURE_MARKS:
                item.add_marker(FIXTURE_MARKS[name])
    # The modules that shut the session's Ray down (no_ray) run last, in their order: one in
    # the middle costs the next ray_cluster user a Ray start and its workers' first imports.
    def module(item) -> str:
        return getattr(getattr(item, "module", None), "__name__", "")

    stops_ray = {module(item) for item in items if "no_ray" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: module(item) in stops_ray)
    users = [item.nodeid for item in items if "openai_server" in getattr(item, "fixturenames", ())]
    _OPENAI_SERVER["last_user"] = users[-1] if users else None
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs CUDA (marked gpu); none here")
            for item in gpu:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
