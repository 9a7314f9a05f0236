"""The one interface every inference backend implements.

A batch of chats (lists of ``{"role", "content"}`` messages) goes in; texts, or the scores of a
fixed set of labels, come out. Rows that the engine cannot serve (a prompt over the context
length, say) come back with ``error`` set instead of failing the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from palign.core.prompts import Chat


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by both backends."""

    max_tokens: int | None = 256  # None: until the context is full (max_model_len - prompt)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None


@dataclass
class LabelScores:
    """Log-probabilities of each label's first token at the first answer position."""

    logprobs: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


class Engine(Protocol):
    name: str

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]: ...

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What an actor needs to build its engine. Every field is given: the defaults live in the
    run config (``palign.core.config.EngineConfig``), and ``palign.runtime.worker.engine_spec``
    makes a spec from it."""

    model: str  # a local Hugging Face folder (short names are resolved before this point)
    backend: str  # "auto" (vLLM where installed), "vllm" or "transformers"
    dtype: str  # "auto": float32 on CPU, bfloat16 on GPU
    max_model_len: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    enforce_eager: bool | None  # None: True on CPU (compiling takes minutes there)
    cpu_kv_cache_gib: float
    max_num_seqs: int
    seed: int
    executor_backend: str | None  # vLLM distributed_executor_backend (None: its default)
    engine_kwargs: dict[str, Any]  # more vLLM engine arguments
    vllm_driver: str  # "step" (LLMEngine, in process) or "async_llm" (AsyncLLM)
    # extra variables for the model's chat template (models.chat_template_kwargs, student only)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


# Helpers both backends share, so that they feed the model identical token ids and reject the
# same rows with the same message.


def prompt_token_ids(tokenizer: Any, chat: Chat,
                     template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Render ``chat`` with the tokenizer's chat template, ready for the assistant's reply;
    ``template_kwargs``: extra variables for the template (``{"enable_thinking": False}``).

    The template writes every special token itself, so the text is tokenised without adding any
    again (otherwise a BOS would be doubled, and the backends would disagree).
    """
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                         **(template_kwargs or {}))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer: Any, chat: Chat, new_tokens: int | None, max_model_len: int,
               row: Completion | LabelScores,
               template_kwargs: Mapping[str, Any] | None = None) -> list[int] | None:
    """The prompt token ids of ``chat`` when they and ``new_tokens`` fit the context, else None;
    ``new_tokens`` None: the output may take whatever the prompt leaves of the context (at
    least one token), as vLLM does when max_tokens is left to the context.

    Sets ``row.prompt_tokens``; a row that does not fit gets its ``error`` (and a completion its
    ``finish_reason`` "error").
    """
    ids = prompt_token_ids(tokenizer, chat, template_kwargs)
    row.prompt_tokens = len(ids)
    if len(ids) + (new_tokens or 1) <= max_model_len:
        return ids
    wanted = f"{new_tokens} new" if new_tokens else "at least 1 new (up to the context)"
    row.error = (
        f"prompt too long: {len(ids)} tokens + {wanted}"
        f" > max_model_len {max_model_len}"
    )
    if isinstance(row, Completion):
        row.finish_reason = "error"
    return None


def fit_prompts(tokenizer: Any, chats: list[Chat], new_tokens: int | None, max_model_len: int,
                rows: Sequence[Completion | LabelScores],
                template_kwargs: Mapping[str, Any] | None = None
                ) -> list[tuple[int, list[int]]]:
    """(index, prompt token ids) of the chats that fit (``fit_prompt``, with ``rows[i]`` the
    result of ``chats[i]``); the others' rows get their error."""
    fitting: list[tuple[int, list[int]]] = []
    for i, (chat, row) in enumerate(zip(chats, rows, strict=True)):
        ids = fit_prompt(tokenizer, chat, new_tokens, max_model_len, row, template_kwargs)
        if ids is not None:
            fitting.append((i, ids))
    return fitting


def new_token_budget(sampling: Sampling, prompt_tokens: int, max_model_len: int) -> int:
    """How many tokens an output may take: ``sampling.max_tokens``, or (None) what the prompt
    leaves of the context."""
    left = max_model_len - prompt_tokens
    return left if sampling.max_tokens is None else min(sampling.max_tokens, left)


def label_first_tokens(tokenizer: Any, labels: list[str]) -> list[int]:
    """The first token id of each label (as it would start the reply); they must all differ."""
    firsts: list[int] = []
    for label in labels:
        ids = tokenizer.encode(label, add_special_tokens=False)
        if not ids:
            raise ValueError(f"label {label!r} encodes to no tokens")
        firsts.append(int(ids[0]))
    if len(set(firsts)) != len(firsts):
        shown = {label: tokenizer.decode([t]) for label, t in zip(labels, firsts)}
        raise ValueError(f"labels must start with distinct tokens, got first tokens {shown}")
    return firsts
