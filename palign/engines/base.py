"""The one interface every inference backend implements.

A batch of chats (lists of ``{"role", "content"}`` messages) goes in; texts, or the scores of a
fixed set of labels, come out. Rows that the engine cannot serve (a prompt over the context
length, say) come back with ``error`` set instead of failing the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Chat = list[dict[str, str]]


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
