"""Fixtures shared across test files: one local Ray cluster for the tests that need the usual
one, started on first use and kept until the session ends."""

from __future__ import annotations

import sys

import pytest

from palign.engines.guard import EXIT_ON_PROMPT_ENV

# A prompt holding this text makes an engine actor's process exit (tests/test_faults.py): the
# session's Ray gives every actor the hook, and no other test data contains the text.
POISON = "__palign_poison_row__"


@pytest.fixture(scope="module")
def ray_cluster():
    """The session's local Ray: 2 CPUs, no dashboard, engines with the poison-row hook."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {EXIT_ON_PROMPT_ENV: POISON}})
    yield


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


@pytest.fixture(scope="module")
def no_ray():
    """For tests that start a Ray of their own (other resources, a `ray start` head) or need
    none at all: the session's Ray is shut down (the next ray_cluster user starts it again)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    yield


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
