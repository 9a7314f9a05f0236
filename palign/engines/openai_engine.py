"""The remote backend (``engine.backend: openai``): chat completions from an OpenAI-compatible
endpoint (``vllm serve``, SGLang, a provider) instead of a model loaded in the actor.

The actor holds no model and no GPU: each row is one ``POST {base_url}/chat/completions``, run
as a coroutine (``drive = "coroutines"``, up to the replica's share of ``max_concurrency`` at
once). The HTTP session lives on an event loop thread of the engine's own, not on the engine
server's: the server's loop is gone by the time the engine is closed, and the session must be
closed on a live loop.

Whose fault an answer is (``palign.engines.http_retry``): 429, 408, 409, 5xx and dropped
connections are retried with backoff up to ``engine.max_retries`` times, then the engine raises
(the machinery's fault: the actor is replaced and the rows retried, none rejected); 401, 403,
404, 405 and 407 raise at once (a bad key, URL or model fails every row alike); any other 4xx is
the row's own (``Completion.error`` with the status and the server's message).

The key is read on the worker from the variable ``engine.api_key_env`` names, and goes only into
the request headers. No aiohttp exception leaves this module (their reprs can carry the request's
headers): each is turned into an ``EngineFailure`` whose message is built here and scrubbed of
the key, and none is raised while another is being handled, so none rides along as context.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from palign.common.failures import EngineFailure
from palign.engines import http_retry
from palign.engines.base import BackendBase, Chat, Completion, EngineSpec, LabelScores, Sampling

log = logging.getLogger(__name__)

T = TypeVar("T")

# The engine's counters (``counters()``): HTTP attempts of chat requests, retries in all and by
# cause, and rows the server refused (4xx). The probe's requests are not counted.
COUNTERS = ("requests", "retries", *(f"retries_{c}" for c in http_retry.CAUSES), "row_errors")
CONNECT_LIMIT_S = 30.0  # to open a connection, within engine.request_timeout_s
CLOSE_LIMIT_S = 10.0
SHOWN_MODELS = 8

_ENDPOINT_HINTS = {
    401: "the key is missing or wrong: check the variable engine.api_key_env names",
    403: "the key may not use this endpoint or model",
    404: "check engine.base_url (up to /v1) and the model name",
    405: "check engine.base_url (up to /v1)",
    407: "a proxy wants credentials",
}


class OpenAIEngine(BackendBase):
    """A backend that sends each generation to an OpenAI-compatible chat endpoint."""

    name = "openai"
    drive = "coroutines"

    def __init__(self, spec: EngineSpec) -> None:
        if not spec.base_url:
            raise EngineFailure("engine.base_url: required with backend openai")
        self.spec = spec
        self.url = spec.base_url.rstrip("/")
        self._key = _read_key(spec.api_key_env)
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="palign-openai-http")
        self._thread.start()
        try:
            self._session = self._run(self._open_session())
            served = self._run(self._probe())
        except BaseException:
            self.close()
            raise
        log.info("openai engine: %s serves %s (root %s)", self.url, spec.model,
                 served.get("root") or "not given")

    # -- the Backend calls --------------------------------------------------------------

    async def serve(self, kind: str, chat: Chat, arg: Any, index: int = 0
                    ) -> Completion | LabelScores:
        """One chat completion, sent on the engine's own loop and awaited here."""
        if kind != "generate":
            raise NotImplementedError("the openai backend does not score labels: a chat "
                                      "endpoint gives no exact label log-probabilities")
        loop = self._live_loop()
        future = asyncio.run_coroutine_threadsafe(self._complete(chat, arg, index), loop)
        return await asyncio.wrap_future(future)

    def generate(self, chats: list[Chat], sampling: Sampling) -> list[Completion]:
        """The chats at once (the engine server calls ``serve``; this is for direct use)."""

        async def every() -> list[Completion]:
            tasks = [asyncio.ensure_future(self._complete(chat, sampling, i))
                     for i, chat in enumerate(chats)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise

        return self._run(every())

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Close the session on the engine's loop, then end the loop; safe to call twice."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._session is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CLOSE_LIMIT_S)
            except Exception:  # noqa: BLE001 - being thrown away either way
                log.warning("openai engine: closing the HTTP session did not finish cleanly")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(CLOSE_LIMIT_S)
        if not self._thread.is_alive():
            loop.close()

    # -- on the engine's loop -----------------------------------------------------------

    async def _open_session(self) -> aiohttp.ClientSession:
        limit_s = self.spec.request_timeout_s
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, self.spec.in_flight_per_replica())),
            timeout=aiohttp.ClientTimeout(total=limit_s,
                                          sock_connect=min(CONNECT_LIMIT_S, limit_s)),
            headers=headers)

    async def _shutdown(self) -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _probe(self) -> dict[str, Any]:
        """``GET /models``: the endpoint answers, and serves the stage's model."""
        status, body = await self._request("GET", "/models")
        if status >= 300:  # a 4xx the chat path would pin on a row: no row here
            raise EngineFailure(f"openai engine: GET {self.url}/models answered HTTP {status}: "
                                f"{http_retry.server_message(body, self._key)}")
        data = self._json(body, "GET /models")
        listed = data.get("data") if isinstance(data.get("data"), list) else []
        models = {str(m.get("id")): m for m in listed if isinstance(m, dict)}
        if self.spec.model not in models:
            names = sorted(models)
            shown = names[:SHOWN_MODELS] + (["..."] if len(names) > SHOWN_MODELS else [])
            raise EngineFailure(f"openai engine: {self.url} serves {shown}, not "
                                f"{self.spec.model!r} (the stage's model)")
        return models[self.spec.model]

    async def _complete(self, chat: Chat, sampling: Sampling, index: int) -> Completion:
        status, body = await self._request("POST", "/chat/completions",
                                           request_body(self.spec, chat, sampling, index),
                                           counted=True)
        if status >= 300:
            self._count("row_errors")
            message = http_retry.server_message(body, self._key)
            return Completion(finish_reason="error",
                              error=f"HTTP {status} from {self.url}: {message}")
        result = parse_completion(self._json(body, "POST /chat/completions"))
        if result.error:
            self._count("row_errors")
            result.error = f"{result.error} from {self.url}"
        return result

    async def _request(self, method: str, path: str, payload: Any = None,
                       counted: bool = False) -> tuple[int, bytes]:
        """The status and body of a 2xx or a row's 4xx, retrying what passes; raises
        EngineFailure for the endpoint's faults and once the retries are used up."""
        assert self._session is not None
        spec, url = self.spec, self.url + path
        last = ""
        for retry in range(spec.max_retries + 1):
            if counted:
                self._count("requests")
            status: int | None = None
            body, retry_after, bad_url = b"", None, False
            try:
                async with self._session.request(method, url, json=payload,
                                                 allow_redirects=False) as resp:
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                    body = await resp.read()
            except aiohttp.InvalidURL:
                bad_url = True
            except (aiohttp.ClientError, OSError) as err:  # TimeoutError is an OSError
                status, last = None, self._network_cause(err)
            if bad_url:
                raise EngineFailure(f"openai engine: engine.base_url {self.url!r} is not a "
                                    "URL aiohttp can request")
            if status is not None:
                verdict = http_retry.classify(status)
                if verdict in (http_retry.OK, http_retry.ROW):
                    return status, body
                message = http_retry.server_message(body, self._key)
                if verdict == http_retry.ENDPOINT:
                    hint = _ENDPOINT_HINTS.get(status, "the endpoint is misconfigured")
                    raise EngineFailure(f"openai engine: {method} {url} answered HTTP {status} "
                                        f"({hint}): {message}")
                last = f"HTTP {status}: {message}"
            if retry == spec.max_retries:
                break
            if counted:
                self._count("retries")
                self._count(f"retries_{http_retry.retry_cause(status)}")
            await asyncio.sleep(http_retry.wait_s(retry, spec.retry_backoff_s,
                                                  spec.retry_backoff_max_s, retry_after))
        raise EngineFailure(
            f"openai engine: {method} {url} failed {spec.max_retries + 1} attempts "
            f"(engine.max_retries={spec.max_retries}, engine.request_timeout_s="
            f"{spec.request_timeout_s:g} s each): last {last}")

    # -- helpers ------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._live_loop()).result()

    def _live_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the openai engine is closed")
        return self._loop

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _network_cause(self, err: BaseException) -> str:
        if isinstance(err, TimeoutError):
            return f"no answer within engine.request_timeout_s={self.spec.request_timeout_s:g} s"
        text = http_retry.scrub(" ".join(str(err).split()), self._key)
        return f"{type(err).__name__}: {text}"[:http_retry.MESSAGE_CHARS]

    def _json(self, body: bytes, what: str) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            shown = http_retry.server_message(body, self._key, limit=120)
            raise EngineFailure(f"openai engine: {what} at {self.url} answered 2xx with a body "
                                f"that is not a JSON object (is engine.base_url the API, up to "
                                f"/v1?): {shown}")
        return data


def request_body(spec: EngineSpec, chat: Chat, sampling: Sampling, index: int) -> dict[str, Any]:
    """The chat request for one row: the stage's sampling settings, a seed per row (so the
    duplicated prompts of pass@k still draw different samples), the template's variables, and
    ``engine_kwargs`` as extra fields. Fields a plain OpenAI server refuses are sent only when
    they change something."""
    body: dict[str, Any] = {"model": spec.model, "messages": chat,
                            "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.max_tokens is not None:  # None: the server fills what the context leaves
        body["max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        body["seed"] = sampling.seed + index
    if sampling.repetition_penalty != 1.0:
        body["repetition_penalty"] = sampling.repetition_penalty
    if spec.chat_template_kwargs:
        body["chat_template_kwargs"] = dict(spec.chat_template_kwargs)
    body.update(spec.engine_kwargs)  # none of the keys above (engine_args refuses them)
    return body


def parse_completion(data: dict[str, Any]) -> Completion:
    """A Completion from a chat answer. A server that splits the reasoning off (``reasoning``,
    or DeepSeek's ``reasoning_content``) gets it joined back before the answer, so the text
    ends with its answer as a local engine's does."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Completion(finish_reason="error", error="HTTP 200 with no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    reasoning = _text(message.get("reasoning") or message.get("reasoning_content"))
    text = "\n\n".join(part for part in (reasoning, _text(message.get("content"))) if part)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") if isinstance(details, dict) else None) \
        or usage.get("prompt_cache_hit_tokens") or 0
    return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      cached_tokens=int(cached),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      finish_reason=str(choice.get("finish_reason") or ""),
                      model=str(data.get("model") or ""))


def _text(value: Any) -> str:
    """A message field's text: a string, or the text parts of a list of content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text") or "") for p in value if isinstance(p, dict))
    return ""


def _read_key(var: str | None) -> str | None:
    """The key from the variable ``engine.api_key_env`` names (None: no key is sent)."""
    if not var:
        return None
    value = os.environ.get(var, "").strip()
    if not value:
        raise EngineFailure(f"engine.api_key_env: {var} is not set on this worker (host "
                            f"{socket.gethostname()}); set it on every node, see "
                            "docs/cluster.md")
    return value
