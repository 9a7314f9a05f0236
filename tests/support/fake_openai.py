"""A small OpenAI-compatible chat server for tests, in process on 127.0.0.1.

It answers ``GET /v1/models`` and ``POST /v1/chat/completions`` with canned completions that
carry usage (words counted as tokens), optionally with the reasoning split off as vLLM's
``--reasoning-parser`` and DeepSeek's API do. Tests script what it answers:

- ``script``: replies to the next chat requests, in order (then canned answers again);
- ``rule(n, body)``: a reply for chat request ``n`` (1-based) or None, asked when the script is
  empty (a row whose question says ``POISON-400`` answered 400, every fifth request 429);
- ``probe_script``: replies to the next ``GET /models``;
- ``key``: when set, any request without ``Authorization: Bearer <key>`` gets a 401 (whose
  message echoes the header it got, as careless servers do: the client must scrub it).

A :class:`Reply` with ``status`` 0 drops the connection without answering; ``delay_s`` holds
the answer back (a slow or hung server). Everything it saw is kept: ``chats`` (the bodies of
chat requests), ``auth`` (each request's Authorization header), ``statuses`` (a Counter).

It is also a fault proxy in front of a real server (vLLM's, tests/support/vllm_server.py):
with ``upstream`` (that server's URL up to ``/v1``) whatever the scripts and rules do not
answer is forwarded there, Authorization header as received, and the server's own answer
(status and body) goes back; ``statuses`` then counts the server's statuses beside the faults.
``silent_after=n`` makes it go silent after ``n`` chat requests: every request after that
(``GET /models`` included) is held, unanswered, until the server is closed (``held`` counts
them): an endpoint that stops answering mid-run.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ports import free_port

PREFIX = "/v1"
FORWARD_LIMIT_S = 300.0  # one forwarded request (a CPU server generating a batch)


@dataclass
class Reply:
    status: int  # 0: drop the connection without an answer
    message: str = ""
    retry_after: str | None = None
    delay_s: float = 0.0


Rule = Callable[[int, dict[str, Any]], "Reply | None"]

# What ``_decide`` returns in place of a payload: forward the request upstream, or hold it.
FORWARD: dict[str, Any] = {}
HOLD = Reply(0)


class FakeOpenAI:
    def __init__(self, models: Iterable[str] = ("fake-model",), key: str | None = None,
                 reasoning_field: str | None = None, cached_tokens: int = 0,
                 script: Iterable[Reply] = (), probe_script: Iterable[Reply] = (),
                 rule: Rule | None = None, delay_s: float = 0.0, upstream: str | None = None,
                 silent_after: int | None = None) -> None:
        self.models = list(models)
        self.key = key
        self.reasoning_field = reasoning_field  # "reasoning" (vLLM) or "reasoning_content"
        self.cached_tokens = cached_tokens
        self.script = collections.deque(script)
        self.probe_script = collections.deque(probe_script)
        self.rule = rule
        self.delay_s = delay_s  # before every canned answer
        self.upstream = upstream.rstrip("/") if upstream else None
        self.silent_after = silent_after
        self.held = 0
        self._closed = threading.Event()  # releases the held requests
        # no proxy from the environment between us and a server on 127.0.0.1
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.chats: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self._n = 0
        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="fake-openai")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    # -- deciding an answer (under the lock: requests come from many threads) ----------

    def _decide(self, method: str, path: str, auth: str | None,
                body: dict[str, Any]) -> tuple[Reply, dict[str, Any] | None]:
        with self._lock:
            if self.silent_after is not None and self._n >= self.silent_after:
                self.held += 1
                return HOLD, None
            self.auth.append(auth)
            if self.key is not None and auth != f"Bearer {self.key}":
                return Reply(401, f"Incorrect API key provided: {auth}"), None
            if method == "GET" and path == f"{PREFIX}/models":
                if self.probe_script:
                    return self.probe_script.popleft(), None
                if self.upstream:
                    return Reply(200), FORWARD
                return Reply(200), {"object": "list", "data": [
                    {"id": m, "object": "model", "root": f"/models/{m}"} for m in self.models]}
            if method != "POST" or path != f"{PREFIX}/chat/completions":
                return Reply(404, f"no route {method} {path}"), None
            self._n += 1
            self.chats.append(body)
            scripted = self.script.popleft() if self.script else None
            if scripted is None and self.rule is not None:
                scripted = self.rule(self._n, body)
            if scripted is not None and scripted.status != 200:
                return scripted, None
            delay_s = scripted.delay_s if scripted is not None else self.delay_s
            if self.upstream:
                return Reply(200, delay_s=delay_s), FORWARD
            return Reply(200, delay_s=delay_s), self._completion(body)

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        asked = body["messages"][-1]["content"]
        content = f"The answer to {asked} is \\boxed{{42}}"
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning_field:
            message[self.reasoning_field] = f"Thinking about {asked}"
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        return {"id": f"chatcmpl-{self._n}", "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": len(content.split()),
                          "total_tokens": prompt + len(content.split()),
                          "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}}

    def _forward(self, method: str, path: str, auth: str | None,
                 raw: bytes) -> tuple[int, bytes, str | None]:
        """The upstream server's status, body and Retry-After for this request."""
        assert self.upstream is not None
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        request = urllib.request.Request(self.upstream + path[len(PREFIX):], method=method,
                                         data=raw if method == "POST" else None,
                                         headers=headers)
        try:
            with self._opener.open(request, timeout=FORWARD_LIMIT_S) as answer:
                return answer.status, answer.read(), answer.headers.get("Retry-After")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Retry-After")
        except OSError as err:  # the upstream is down: a gateway's answer
            message = {"error": {"message": f"upstream: {err}", "code": 502}}
            return 502, json.dumps(message).encode(), None


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            body = json.loads(raw) if raw else {}
            reply, payload = fake._decide(method, self.path, self.headers.get("Authorization"),
                                          body)
            if reply is HOLD:  # silent: answer nothing until the server closes
                fake._closed.wait()
            if reply.delay_s:
                time.sleep(reply.delay_s)
            status, retry_after = reply.status, reply.retry_after
            if payload is FORWARD:
                status, data, retry_after = fake._forward(method, self.path,
                                                          self.headers.get("Authorization"), raw)
            if reply is not HOLD:
                with fake._lock:
                    fake.statuses[status] += 1
            if status == 0:
                self.close_connection = True
                self.connection.close()
                return
            if payload is None and status != 200:
                payload = {"error": {"message": reply.message or f"status {status}",
                                     "type": "invalid_request_error", "code": status}}
            if payload is not FORWARD:
                data = json.dumps(payload or {}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up waiting (a time-out test): nobody to answer
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass

    return Handler
