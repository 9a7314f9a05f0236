"""``engine.engine_kwargs``: any vLLM engine argument, passed through to ``vllm.LLM``; or,
with the remote backend (``openai``), extra fields of every chat request (``top_k``, ``min_p``,
``reasoning_effort``: whatever the server takes).

Checked before any work: each name must be one of vLLM's own ``EngineArgs`` fields (from the
installed vLLM, so the check follows its version), and none may be one that palign sets from
its own fields (``RESERVED`` names which field to use instead). Only the vLLM and openai
backends take them: a stage whose engine is the transformers backend and has any fails; a
backend named by import path gets them unchecked. A request field is the server's to check, so
for openai only the fields palign sets itself are refused (``REQUEST_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util

# vLLM arguments palign sets itself, and the engine field that sets each.
RESERVED = {
    "model": "models.* (the stage's model)",
    "tokenizer": "models.* (the model's own tokenizer)",
    "dtype": "engine.dtype",
    "max_model_len": "engine.max_model_len",
    "tensor_parallel_size": "engine.tensor_parallel_size",
    "enable_prefix_caching": "engine.enable_prefix_caching",
    "enforce_eager": "engine.enforce_eager",
    "seed": "the stage's sampling seed",
    "max_num_seqs": "engine.max_num_seqs",
    "gpu_memory_utilization": "engine.gpu_memory_utilization",
    "kv_cache_memory_bytes": "engine.cpu_kv_cache_gib",
    "distributed_executor_backend": "engine.tensor_parallel_size (palign places the ranks)",
    "logprobs_mode": "nothing: label scores need raw log-probabilities",
    "max_logprobs": "nothing: palign's verdicts set it",
}


# Chat request fields the openai backend sets itself, and where each comes from ({stage}: the
# stage whose engine it is).
REQUEST_FIELDS = {
    "model": "models.* (the stage's model, as the server names it)",
    "messages": "nothing: the stage writes the chat",
    "stream": "nothing: palign reads whole answers",
    "n": "nothing: one completion per request (the stage asks as often as it needs)",
    "max_tokens": "{stage}.sampling.max_tokens",
    "max_completion_tokens": "{stage}.sampling.max_tokens",
    "temperature": "{stage}.sampling.temperature",
    "top_p": "{stage}.sampling.top_p",
    "seed": "{stage}.sampling.seed",
    "repetition_penalty": "{stage}.sampling.repetition_penalty",
    "chat_template_kwargs": "models.chat_template_kwargs",
}


@functools.lru_cache(maxsize=1)
def vllm_engine_arg_names() -> frozenset[str] | None:
    """The names of the installed vLLM's engine arguments; None where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def kwargs_problems(where: str, kwargs: dict[str, object], backend: str) -> list[str]:
    """The problems of one stage's ``engine_kwargs`` (``where``: its dotted path). A backend
    named by import path takes what it takes: its arguments are its own to check."""
    if not kwargs or ":" in backend:
        return []
    if backend == "openai":
        stage = where.split(".", 1)[0]
        return [f"{where}.{key}: set by palign; use {REQUEST_FIELDS[key].format(stage=stage)}"
                for key in kwargs if key in REQUEST_FIELDS]
    names = vllm_engine_arg_names()
    if backend == "transformers" or (backend == "auto" and names is None):
        return [f"{where}: vLLM engine arguments, but this stage's engine is the transformers "
                f"backend (they apply to vllm only)"]
    problems = []
    for key in kwargs:
        if key in RESERVED:
            problems.append(f"{where}.{key}: set by palign; use {RESERVED[key]}")
        elif names is not None and key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}.{key}: not an engine argument of the installed vLLM{hint}")
    return problems
