"""One engine, many callers: requests in flight from many threads and coroutines at once.

A stage actor runs several Ray Data batches at the same time (one thread each), and the
truncate stage runs one coroutine per row. They all share the actor's engine through an
:class:`EngineServer`, which owns the engine and drives it from a single thread:

- **Continuous backends** (vLLM; ``drive`` "steps" or "coroutines"): each request is added to
  the engine the moment it arrives, and the thread steps the engine while anything is
  unfinished. A finished request is answered at once, so a caller's next request (a row's next
  probe, the next batch's rows) joins the running batch instead of waiting for the slowest
  request of a batch.
- **Batch backends** (transformers; ``drive`` "batch"): whatever is queued when the engine is
  free is run together, greedy and label-score requests merged into one call per kind; a call
  with seeded sampling runs alone, exactly as it was submitted, so its samples do not depend on
  what else was queued.

``max_in_flight`` bounds the requests handed to the engine at once; more wait in the server's
queue, in arrival order. A caller that will send a row's requests one after another (the
per-row judge search) can first ``admit`` the row: it reserves the row's longest prompt in
tokens against the engine's KV cache (vLLM reports its size), and waits while the rows already
admitted fill it. Rows admitted together then fit in the cache together, so least-recently-used
eviction does not drop a row's prefix between its requests.

Anything the engine raises fails every request in flight and every later one with that
exception: the server is dead and the actor must be replaced (the stage worker turns it into a
machinery failure).

Two vLLM drivers (``engine.vllm_driver``). ``step`` (default) steps ``LLMEngine`` from the
server's thread, in process: requests join the running batch as they arrive. ``async_llm``
runs vLLM's ``AsyncLLM`` on an event loop in the server's thread, a task per request; vLLM
always puts that engine's core in a child process (``make_async_mp_client``), which on the CPU
build costs about 30 s more per start and sits outside the Ray actor's CPU accounting, while
on a GPU it overlaps the engine's steps with our Python. Both schedule requests the same way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from palign.common.failures import describe
from palign.engines.base import Backend, Chat, Completion, LabelScores, Sampling

log = logging.getLogger(__name__)

GENERATE = "generate"
SCORE = "score"
COUNT = "count"  # a prompt's token count (the engine's tokenizer, on the engine's thread)
KV_SHARE = 0.9  # of the engine's KV cache that row reservations may take (see reserve)


@dataclass
class Request:
    kind: str  # GENERATE or SCORE
    chat: Chat
    arg: Any  # Sampling for GENERATE, the labels (a tuple) for SCORE
    index: int  # position in the call that submitted it (seeds: sampling.seed + index)
    future: Future
    unit: int  # the submitting call's number (batch backends keep seeded calls whole)


class EngineServer:
    """Serves a :class:`~palign.engines.base.Backend` to many threads and coroutines, as an
    :class:`~palign.engines.base.Engine` (what a stage may call). ``engine.drive`` says
    how: in steps, as coroutines, or in batches."""

    def __init__(self, engine: Backend, max_in_flight: int = 64) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.inner = engine
        self.name = engine.name
        self.max_in_flight = max_in_flight
        self.continuous = engine.drive == "steps"  # vLLM's LLMEngine
        self.coroutines = engine.drive == "coroutines"  # vLLM's AsyncLLM
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._units = 0
        self._held: dict[int, Request] = {}  # taken from the queue, not yet answered
        self._in_flight = 0  # len(self._held)
        self._peak = 0
        self._window_peak = 0  # the peak since the last stats(window=True)
        self._prompt_tokens = 0  # over every answered request
        self._cached_tokens = 0
        self._completion_tokens = 0  # over every answered generation without an error
        self._dead: BaseException | None = None
        kv_tokens = engine.kv_cache_tokens()
        self.kv_budget: int | None = int(kv_tokens * KV_SHARE) if kv_tokens else None
        self._reserved = 0
        self._peak_reserved = 0
        self._waiting_rows: collections.deque[tuple[int, Future]] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"palign-{self.name}-server",
                                        daemon=True)
        self._thread.start()

    # -- what callers use ---------------------------------------------------------------

    def submit(self, kind: str, chats: list[Chat], arg: Any) -> list[Future]:
        """Queue one request per chat; each future holds a Completion or a LabelScores."""
        with self._cv:
            if self._dead is not None:
                raise RuntimeError(f"the {self.name} engine has failed: "
                                   f"{describe(self._dead)}") from self._dead
            if self._closing:
                raise RuntimeError(f"the {self.name} engine is closed")
            self._units += 1
            requests = [Request(kind, chat, arg, i, Future(), self._units)
                        for i, chat in enumerate(chats)]
            self._queue.extend(requests)
            self._cv.notify_all()
        self._poke()
        return [r.future for r in requests]

    def _poke(self) -> None:
        """Wake the event loop of the coroutine driver (the others wait on the condition)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        return [f.result() for f in self.submit(GENERATE, chats, sampling)]

    def score_labels(self, chats: list[Chat], labels: list[str]) -> list[LabelScores]:
        return [f.result() for f in self.submit(SCORE, chats, tuple(labels))]

    async def agenerate(self, chat: Chat, sampling: Sampling) -> Completion:
        """One generation, awaited by a coroutine."""
        (future,) = self.submit(GENERATE, [chat], sampling)
        return await asyncio.wrap_future(future)

    async def ascore_labels(self, chat: Chat, labels: list[str]) -> LabelScores:
        (future,) = self.submit(SCORE, [chat], tuple(labels))
        return await asyncio.wrap_future(future)

    async def admit(self, chat: Chat) -> int:
        """Reserve ``chat``'s tokens (a row's longest prompt) against the KV cache, waiting
        while other admitted rows hold it; returns what to ``release`` (0: no budget here)."""
        if self.kv_budget is None:
            return 0
        (counted,) = self.submit(COUNT, [chat], None)
        tokens = min(await asyncio.wrap_future(counted), self.kv_budget)
        with self._cv:
            if self._dead is not None:
                raise RuntimeError(f"the {self.name} engine has failed: "
                                   f"{describe(self._dead)}")
            granted: Future = Future()
            if not self._waiting_rows and self._reserved + tokens <= self.kv_budget:
                self._reserved += tokens
                self._peak_reserved = max(self._peak_reserved, self._reserved)
                granted.set_result(tokens)
            else:
                self._waiting_rows.append((tokens, granted))
        return await asyncio.wrap_future(granted)

    def release(self, tokens: int) -> None:
        """Give back what ``admit`` reserved; admits waiting rows, first come first served."""
        if not tokens:
            return
        granted: list[tuple[int, Future]] = []
        with self._cv:
            self._reserved -= tokens
            while self._waiting_rows and (
                    self._reserved + self._waiting_rows[0][0] <= (self.kv_budget or 0)):
                n, future = self._waiting_rows.popleft()
                self._reserved += n
                self._peak_reserved = max(self._peak_reserved, self._reserved)
                granted.append((n, future))
        for n, future in granted:
            future.set_result(n)

    def stats(self, window: bool = False) -> dict[str, int]:
        """Requests handed to the engine now and at most so far, those waiting, the prompt
        tokens of every request served (not refused) and how many the prefix cache served, the
        tokens generated, and the backend's own ``counters()`` (a remote one's requests and
        retries). ``window``: also the most in flight since the last such call
        (``window_peak``)."""
        counters = self.inner.counters()
        with self._cv:
            extra = {}
            if window:
                extra["window_peak"] = self._window_peak
                self._window_peak = self._in_flight
            return {**counters, **extra, "in_flight": self._in_flight,
                    "peak_in_flight": self._peak, "queued": len(self._queue),
                    "peak_reserved": self._peak_reserved, "prompt_tokens": self._prompt_tokens,
                    "cached_tokens": self._cached_tokens,
                    "completion_tokens": self._completion_tokens}

    def stop(self) -> None:
        """Finish what is in flight and end the server's thread; the engine stays open."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._poke()
        self._thread.join(timeout=60)

    def close(self) -> None:
        self.stop()
        self.inner.close()

    # -- the engine's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.coroutines:
                self._run_coroutines()
            elif self.continuous:
                self._run_continuous()
            else:
                self._run_batches()
        except BaseException as err:  # noqa: BLE001 - every waiter must hear of it
            log.error("%s engine server: the engine raised; failing every request",
                      self.name, exc_info=True)
            self._fail_all(err)

    def _take(self, room: int, busy: bool, whole: bool = False) -> list[Request] | None:
        """Up to ``room`` queued requests (``whole``: and the rest of the last one's call);
        waits for some unless ``busy``. None: closing and nothing left."""
        with self._cv:
            while not self._queue and not busy:
                if self._closing:
                    return None
                self._cv.wait()
            taken = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            while whole and taken and self._queue and self._queue[0].unit == taken[-1].unit:
                taken.append(self._queue.popleft())
            self._held.update((id(r), r) for r in taken)
            self._in_flight += len(taken)
            self._peak = max(self._peak, self._in_flight)
            self._window_peak = max(self._window_peak, self._in_flight)
            return taken

    def _answer(self, req: Request, result: Any) -> None:
        with self._cv:
            self._held.pop(id(req), None)
            self._in_flight -= 1
            if req.kind != COUNT and not result.error:  # a refused prompt was never computed
                self._prompt_tokens += result.prompt_tokens
                self._cached_tokens += result.cached_tokens
                if isinstance(result, Completion):
                    self._completion_tokens += result.completion_tokens
        req.future.set_result(result)

    def _run_continuous(self) -> None:
        engine = self.inner
        open_: dict[str, Request] = {}
        while True:
            taken = self._take(self.max_in_flight - len(open_), busy=bool(open_))
            if taken is None:
                return
            for req in taken:
                if req.kind == COUNT:
                    self._answer(req, engine.count_tokens(req.chat))
                    continue
                result, request_id = engine.open_request(req.kind, req.chat, req.arg, req.index)
                if request_id is None:  # the row cannot be served (too long): answered now
                    self._answer(req, result)
                else:
                    open_[request_id] = req
            if open_:
                for request_id, result in engine.step_requests():
                    self._answer(open_.pop(request_id), result)

    def _run_coroutines(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._pump())
        finally:
            loop.close()

    async def _pump(self) -> None:
        """Start a task per request as room allows; the engine's own loop batches them."""
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        failure: list[BaseException] = []

        async def one(req: Request) -> None:
            try:
                if req.kind == COUNT:
                    result: Any = self.inner.count_tokens(req.chat)
                else:
                    result = await self.inner.serve(req.kind, req.chat, req.arg, req.index)
            except BaseException as err:  # noqa: BLE001 - the engine failed: fail them all
                failure.append(err)
            else:
                self._answer(req, result)

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            wake.set()

        wake = self._wake
        while True:
            wake.clear()  # before looking: a submit or a finished task after this wakes us
            if failure:
                raise failure[0]
            with self._cv:
                done = self._closing and not self._queue and not tasks
            if done:
                return
            taken = self._take(self.max_in_flight - len(tasks), busy=True) or []
            for req in taken:
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(finished)
            if not taken or len(tasks) >= self.max_in_flight:
                await wake.wait()

    def _run_batches(self) -> None:
        engine = self.inner
        while True:
            taken = self._take(self.max_in_flight, busy=False, whole=True)
            if taken is None:
                return
            for req in [r for r in taken if r.kind == COUNT]:
                self._answer(req, engine.count_tokens(req.chat))
            for group in _groups([r for r in taken if r.kind != COUNT]):
                first = group[0]
                chats = [r.chat for r in group]
                if first.kind == SCORE:
                    results = engine.score_labels(chats, list(first.arg))
                else:
                    results = engine.generate(chats, first.arg)
                for req, result in zip(group, results):
                    self._answer(req, result)

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            self._dead = err
            waiting = [r.future for r in self._held.values()] + [r.future for r in self._queue]
            waiting += [future for _, future in self._waiting_rows]
            self._held.clear()
            self._queue.clear()
            self._waiting_rows.clear()
            self._in_flight = 0
        for future in waiting:
            if not future.done():
                future.set_exception(err)


def _groups(requests: list[Request]) -> list[list[Request]]:
    """Batch backends: merge what gives the same answers merged (label scores with the same
    labels; greedy or unseeded generation with the same settings); a seeded sampled call stays
    the call it was, in its order, so it draws the samples it would have drawn alone."""
    groups: dict[Any, list[Request]] = {}
    for req in requests:
        if req.kind == SCORE:
            key: Any = (SCORE, req.arg)
        elif req.arg.temperature == 0 or req.arg.seed is None:
            key = (GENERATE, req.arg)
        else:
            key = (GENERATE, req.arg, req.unit)
        groups.setdefault(key, []).append(req)
    return list(groups.values())
