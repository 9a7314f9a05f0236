"""The two interfaces of inference: what a backend provides, and what a stage may call.

A batch of chats (lists of ``{"role", "content"}`` messages) goes in; texts, or the scores of a
fixed set of labels, come out. Rows that the engine cannot serve (a prompt over the context
length, say) come back with ``error`` set instead of failing the whole batch.

- :class:`Backend`: what an inference backend (vLLM, transformers, or a class named by import
  path in ``engine.backend``) provides to the engine server that drives it
  (``palign.engines.server``), including how it is driven (``drive``).
  :class:`BackendBase` holds the defaults, so a backend driven in batches writes only
  ``generate`` and ``score_labels``.
- :class:`Engine`: what a stage may call on the engine it is handed (the actor's
  ``GuardedEngine`` over an ``EngineServer``): batched calls, and one request awaited at a time.

Each declares every call its user makes, so neither side probes the other for what it has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from palign.config import EngineConfig
from palign.method.prompts import Chat


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
    model: str = ""  # the model that answered, as a remote server names it ("": a local engine)


@dataclass
class LabelScores:
    """Log-probabilities of each label's first token at the first answer position."""

    logprobs: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


# How the engine server drives a backend:
# - "batch": whatever is queued when the backend is free, in one generate / score_labels call;
# - "steps": open_request adds one request to the running engine and step_requests advances
#   it, answering the requests it finished (vLLM's LLMEngine, in process);
# - "coroutines": serve awaits one request on the server's event loop (vLLM's AsyncLLM).
Drive = Literal["batch", "steps", "coroutines"]


class Batched(Protocol):
    """Batched calls, answered by a backend and by the engine a stage is handed alike."""

    name: str

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]: ...

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Batched, Protocol):
    """What an inference backend provides; ``drive`` says which of the request calls the
    engine server uses (the others are never called)."""

    drive: Drive

    def count_tokens(self, chat: Chat) -> int:
        """The prompt tokens ``chat`` takes, as the backend renders it; asked only when
        ``kv_cache_tokens`` gives a size (to reserve a row's tokens against it)."""
        ...

    def kv_cache_tokens(self) -> int | None:
        """Tokens the backend's KV cache holds; None: no cache to share out."""
        ...

    def open_request(self, kind: str, chat: Chat, arg: Any, index: int = 0
                     ) -> tuple[Completion | LabelScores, str | None]:
        """drive "steps": queue one request; its result and id (None: refused, answered)."""
        ...

    def step_requests(self) -> list[tuple[str, Completion | LabelScores]]:
        """drive "steps": one engine step; the requests it finished, with their results."""
        ...

    async def serve(self, kind: str, chat: Chat, arg: Any, index: int = 0
                    ) -> Completion | LabelScores:
        """drive "coroutines": one request, awaited until it is done."""
        ...

    def counters(self) -> dict[str, int]:
        """The backend's own counts so far (a remote one's requests and retries), merged
        into the engine's ``stats``; {} for a backend with none."""
        ...


class Engine(Batched, Protocol):
    """What a stage may call on the engine it is handed. The awaited calls serve one request
    each, so a row's search sends its next probe the moment the last one is answered."""

    async def agenerate(self, chat: Chat, sampling: Sampling) -> Completion: ...

    async def ascore_labels(self, chat: Chat, labels: list[str]) -> LabelScores: ...

    async def admit(self, chat: Chat) -> int:
        """Reserve ``chat``'s tokens (a row's longest prompt) in the KV cache; what to
        ``release`` when the row is done (0: nothing reserved)."""
        ...

    def release(self, tokens: int) -> None: ...

    def stats(self, window: bool = False) -> dict[str, int]:
        """The engine's counters (requests in flight, prompt and cached tokens)."""
        ...


class BackendBase:
    """A backend's defaults: driven in batches, no KV cache to share out, nothing to close.
    A subclass writes ``name``, ``generate`` and ``score_labels``; one driven in steps or
    coroutines sets ``drive`` and writes those calls too."""

    name = "backend"
    drive: Drive = "batch"

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        raise NotImplementedError(f"the {self.name} backend does not generate")

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        raise NotImplementedError(f"the {self.name} backend does not score labels")

    def count_tokens(self, chat: Chat) -> int:
        raise NotImplementedError(f"the {self.name} backend does not count prompt tokens "
                                  "(it reports no KV cache, so none is reserved)")

    def kv_cache_tokens(self) -> int | None:
        return None

    def open_request(self, kind: str, chat: Chat, arg: Any, index: int = 0
                     ) -> tuple[Completion | LabelScores, str | None]:
        raise NotImplementedError(self._not_driven("steps"))

    def step_requests(self) -> list[tuple[str, Completion | LabelScores]]:
        raise NotImplementedError(self._not_driven("steps"))

    async def serve(self, kind: str, chat: Chat, arg: Any, index: int = 0
                    ) -> Completion | LabelScores:
        raise NotImplementedError(self._not_driven("coroutines"))

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass

    def _not_driven(self, drive: str) -> str:
        return f"the {self.name} backend is driven {self.drive!r}, not in {drive}"


class EngineSpec(EngineConfig):
    """What an actor needs to build its engine: the stage's ``engine`` section (every field
    as the run config merged it, see ``EngineConfig``) plus what the run decides for it."""

    model: str = Field(description="A local Hugging Face folder (short names are resolved "
                                   "before this point).")
    seed: int = Field(default=0, description="The engine's seed (run.seed).")
    executor_backend: str | None = Field(
        default=None, description="vLLM's distributed_executor_backend (None: its default); "
                                  "the pool's plan says how a replica runs its ranks.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra variables for the model's chat template "
                                          "(models.chat_template_kwargs, student only).")

    @classmethod
    def of(cls, engine: EngineConfig, model: str, *, seed: int = 0,
           executor_backend: str | None = None,
           template_kwargs: Mapping[str, Any] | None = None) -> EngineSpec:
        """``engine``'s fields as they are, plus the model and what the run decides."""
        return cls(**dict(engine), model=model, seed=seed, executor_backend=executor_backend,
                   chat_template_kwargs=dict(template_kwargs or {}))


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
