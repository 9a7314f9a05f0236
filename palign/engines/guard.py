"""The engine as the stages see it: every exception it raises is a machinery failure.

A row the engine cannot serve comes back with its ``error`` set (a row fault, see
``palign.common.failures``); anything the engine *raises* (a dead engine core, a CUDA error,
out of memory, a bug in the backend) says the machinery is unsound, so it becomes an
:class:`~palign.common.failures.EngineFailure` that the stage worker hands to Ray instead of
rejecting the rows in flight.

Every call has a time limit (``engine.request_timeout_s``): a call that outlives it (a wedged
GPU, a dead tensor-parallel rank, a deadlock in the backend) raises an EngineFailure too, and the
stage worker ends the actor as for any other machinery failure. A process that cannot run at all
(SIGSTOPped, frozen) cannot time itself out: the stage's watchdog (``palign.runtime.watchdog``)
kills it from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any, TypeVar

from palign.common.failures import EngineFailure, MachineryError, describe
from palign.engines.base import Chat, Completion, Engine, LabelScores, Sampling

log = logging.getLogger(__name__)

HEALTH_CHAT: Chat = [{"role": "user", "content": "Reply with the word OK."}]

T = TypeVar("T")


class GuardedEngine:
    """Wraps an :class:`~palign.engines.base.Engine` (the actor's ``EngineServer``); same
    interface, plus ``health_check``.

    ``timeout_s``: the most one call may take (None: no limit)."""

    def __init__(self, engine: Engine, timeout_s: float | None = None) -> None:
        self.inner = engine
        self.name = engine.name
        self.timeout_s = timeout_s

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        return self._call(self.inner.generate, chats, sampling)

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        return self._call(self.inner.score_labels, chats, labels)

    async def agenerate(self, chat: Chat, sampling: Sampling) -> Completion:
        """One request, awaited."""
        return await self._await(self.inner.agenerate(chat, sampling))

    async def ascore_labels(self, chat: Chat, labels: list[str]) -> LabelScores:
        return await self._await(self.inner.ascore_labels(chat, labels))

    async def admit(self, chat: Chat) -> int:
        """Reserve a row's longest prompt against the engine's KV cache (see EngineServer).
        Its wait counts as a call: an engine that hangs while counting the prompt's tokens, or
        whose admitted rows never finish, must not hang the row."""
        return await self._await(self.inner.admit(chat))

    def release(self, tokens: int) -> None:
        self.inner.release(tokens)

    def stats(self, window: bool = False) -> dict[str, int]:
        return self.inner.stats(window)

    def health_check(self) -> None:
        """One token for a trivial prompt; raises EngineFailure if the engine cannot serve it."""
        out = self.generate([HEALTH_CHAT], Sampling(max_tokens=1))
        if out[0].error:
            raise EngineFailure(f"{self.name} engine failed its health check: {out[0].error}")

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception:  # noqa: BLE001 - it is being thrown away either way
            log.warning("closing the %s engine raised", self.name, exc_info=True)

    def _call(self, fn: Callable[..., T], chats: list[Chat], arg: Any) -> T:
        with self._engine_faults():
            if self.timeout_s is None:
                return fn(chats, arg)
            return _within(self.timeout_s, fn, chats, arg, self._timed_out)

    async def _await(self, call: Awaitable[T]) -> T:
        with self._engine_faults():
            if self.timeout_s is None:
                return await call
            task = asyncio.ensure_future(call)
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
            if not done:
                task.cancel()
                raise self._timed_out()
            return task.result()

    def _timed_out(self) -> EngineFailure:
        return EngineFailure(f"{self.name} engine: no answer within engine.request_timeout_s="
                             f"{self.timeout_s:g} s (a hung engine or device)")

    @contextlib.contextmanager
    def _engine_faults(self) -> Iterator[None]:
        """Whatever the engine raises becomes an EngineFailure (a machinery failure)."""
        try:
            yield
        except MachineryError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the engine raises is its own fault
            raise EngineFailure(f"{self.name} engine: {describe(err)}") from err


def _within(seconds: float, fn: Callable[..., T], chats: list[Chat], arg: Any,
            timed_out: Callable[[], Exception]) -> T:
    """``fn(chats, arg)`` on a thread of its own, waited for at most ``seconds``. A call that
    hangs keeps its (daemon) thread: the actor is about to end anyway, and a thread cannot be
    stopped from outside."""
    result: Future = Future()

    def run() -> None:
        try:
            result.set_result(fn(chats, arg))
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            result.set_exception(err)

    threading.Thread(target=run, name="palign-engine-call", daemon=True).start()
    done, _ = wait([result], timeout=seconds)
    if not done:
        raise timed_out()
    return result.result()

