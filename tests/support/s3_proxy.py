"""A small HTTP proxy in front of the suite's S3-compatible server, for fault tests.

``S3Proxy(upstream)`` listens on 127.0.0.1 and forwards every request (method, path, headers,
body) to ``upstream`` unchanged, Host header included (S3 signs it), and the answer back. A test
points ``AWS_ENDPOINT_URL_S3`` at ``proxy.url`` and chooses, per request, what the proxy does
instead through ``fault``: a callable given the request's number (from 1, across all
connections), method and path, that returns None (forward it) or a ``Fault`` to answer with.
``slow_down_every(n)`` answers S3's throttling error, 503 SlowDown with S3's XML error body, to
every n-th request. The proxy counts what it forwarded and what it refused (``counts``).

``HoldingProxy`` is a plainer one, at the level of TCP: it holds back the first request a test
picks (by its bytes) until the test has done something meanwhile, as a slow network would,
then lets it land late."""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that belong to one hop of HTTP, not to the request: never forwarded as they came.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length"}


@dataclass(frozen=True)
class Fault:
    """An answer the proxy gives instead of forwarding: an HTTP status and S3's error body."""

    status: int
    code: str
    message: str

    def body(self, request_id: int) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
                f"<Message>{self.message}</Message><RequestId>proxy-{request_id}</RequestId>"
                f"<HostId>s3-proxy</HostId></Error>").encode()


SLOW_DOWN = Fault(503, "SlowDown", "Please reduce your request rate.")

FaultRule = Callable[[int, str, str], "Fault | None"]


def slow_down_every(n: int) -> FaultRule:
    """503 SlowDown for requests n, 2n, 3n, ...: a store that throttles one request in n."""
    return lambda number, method, path: SLOW_DOWN if number % n == 0 else None


class S3Proxy:
    """The proxy, serving from a thread of its own until ``close`` (or the ``with`` ends)."""

    def __init__(self, upstream: str, fault: FaultRule | None = None) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.fault = fault
        self.counts: Counter[str] = Counter()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="s3-proxy")
        self._thread.start()

    def __enter__(self) -> S3Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _next(self, method: str, path: str) -> tuple[int, Fault | None]:
        with self._lock:
            number = next(self._numbers)
            fault = self.fault(number, method, path) if self.fault else None
            self.counts["refused" if fault else "forwarded"] += 1
        return number, fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # quiet: a test's output is its own

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response_only(status)  # the server's own Date and Server, not ours
                if not any(k.lower() == "date" for k, _ in headers):
                    self.send_header("Date", self.date_time_string())
                for key, value in headers:
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                if self.command == "HEAD":  # a HEAD answer's length is the object's, no body
                    length = dict((k.lower(), v) for k, v in headers).get("content-length")
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                body = self._body()  # read whole before answering: the connection stays usable
                number, fault = proxy._next(self.command, self.path)
                if fault is not None:
                    self._answer(fault.status, [("Content-Type", "application/xml")],
                                 fault.body(number))
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    got = conn.getresponse()
                    data = got.read()
                    self._answer(got.status, got.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


class HoldingProxy:
    """A TCP proxy to the S3 server that holds the first request ``pick`` chooses until
    ``meanwhile()`` has run, then passes it on: a request that lands late. The result (or the
    exception) of ``meanwhile`` is kept in ``outcome``."""

    def __init__(self, upstream: str, pick: Callable[[bytes], bool],
                 meanwhile: Callable[[], object]) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.pick, self.meanwhile = pick, meanwhile
        self.held = threading.Event()
        self.done = threading.Event()
        self.outcome: object = None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.upstream.hostname, self.upstream.port))
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if requests and not self.held.is_set() and self.pick(data):
                    self.held.set()
                    try:
                        self.outcome = self.meanwhile()
                    except Exception as err:  # noqa: BLE001 - the test reads it
                        self.outcome = err
                    self.done.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
