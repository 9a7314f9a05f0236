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


@pytest.fixture
def no_ray():
    """For tests that start a Ray of their own (other resources) or need none at all."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    yield


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
