"""The one interface every inference backend implements.

A batch of chats (lists of ``{"role", "content"}`` messages) goes in; texts, or the scores of a
fixed set of labels, come out. Rows that the engine cannot serve (a prompt over the context
length, say) come back with ``error`` set instead of failing the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from palign.core.prompts import Chat


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by both backends."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class EngineSpec:
    """What an actor needs to build its engine; made from the run config by the stages."""

    model: str  # a local Hugging Face folder (short names are resolved before this point)
    backend: str = "auto"  # "auto" (vLLM where installed), "vllm" or "transformers"
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on GPU
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: True on CPU (compiling takes minutes there)
    cpu_kv_cache_gib: float = 2.0
    max_num_seqs: int = 64
    seed: int = 0
    executor_backend: str | None = None  # vLLM distributed_executor_backend (None: its default)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # more vLLM engine arguments
    vllm_driver: str = "step"  # "step" (LLMEngine, in process) or "async_llm" (AsyncLLM)


# Helpers both backends share, so that they feed the model identical token ids and reject the
# same rows with the same message.


def prompt_token_ids(tokenizer: Any, chat: Chat) -> list[int]:
    """Render ``chat`` with the tokenizer's chat template, ready for the assistant's reply.

    The template writes every special token itself, so the text is tokenised without adding any
    again (otherwise a BOS would be doubled, and the backends would disagree).
    """
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def too_long_error(prompt_tokens: int, new_tokens: int, max_model_len: int) -> str | None:
    """The row's error when prompt plus new tokens do not fit the context, else None."""
    if prompt_tokens + new_tokens <= max_model_len:
        return None
    return (
        f"prompt too long: {prompt_tokens} tokens + {new_tokens} new"
        f" > max_model_len {max_model_len}"
    )


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
