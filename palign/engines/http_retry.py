"""What an HTTP answer from an inference endpoint means, and how long to wait before asking again.

Pure: no sockets, no event loop, so the remote backend (``palign.engines.openai_engine``) and its
tests share one policy. Whose fault an answer is (``classify``):

- ``ok``: 2xx, the answer;
- ``transient``: 429 (rate limit), 408 (request time-out), 409 (conflict: busy), any 5xx, and
  (decided by the caller) a refused or dropped connection or a time-out. Retried with backoff;
  past the retries the endpoint counts as down, which is the machinery's fault;
- ``endpoint``: 401, 403, 404, 405, 407. A bad key, a wrong URL or model name: the same for every
  row, so no row is to blame and retrying helps nothing. The engine fails at once;
- ``row``: any other 4xx (400, 413, 422, ...): the server refused this request (a prompt over
  its context, a field it does not take). The row is rejected with the server's message.

The wait before retry ``n`` (0 first) is full jitter, uniform in ``[0, min(cap, base * 2**n))``,
so replicas that were throttled together do not come back together; a ``Retry-After`` header
(seconds, or an HTTP date) wins, capped by the same ``cap`` so one answer cannot stall a run.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable

OK = "ok"
TRANSIENT = "transient"
ENDPOINT = "endpoint"
ROW = "row"

ENDPOINT_STATUSES = frozenset({401, 403, 404, 405, 407})
RETRY_STATUSES = frozenset({408, 409, 429})

# The cause a retry is counted under (the backend's retries_<cause> counters).
CAUSES = ("429", "5xx", "network", "other")

MESSAGE_CHARS = 300


def classify(status: int) -> str:
    """``ok``, ``transient``, ``endpoint`` or ``row`` for an HTTP status (see module doc)."""
    if 200 <= status < 300:
        return OK
    if status in RETRY_STATUSES or status >= 500:
        return TRANSIENT
    if status in ENDPOINT_STATUSES:
        return ENDPOINT
    if 400 <= status < 500:
        return ROW
    # 1xx/3xx never reach us (aiohttp follows redirects): an endpoint that answers so is
    # misconfigured, for every row alike.
    return ENDPOINT


def retry_cause(status: int | None) -> str:
    """The counter a retry is counted under; ``status`` None: no answer (connection, time-out)."""
    if status is None:
        return "network"
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    return "other"  # 408, 409


def backoff_s(retry: int, base_s: float, cap_s: float,
              rand: Callable[[], float] = random.random) -> float:
    """Full jitter: a wait drawn uniformly below ``min(cap_s, base_s * 2**retry)``."""
    ceiling = min(cap_s, base_s * 2.0 ** min(retry, 62))
    return max(0.0, ceiling * rand())


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delta-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable. A date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def wait_s(retry: int, base_s: float, cap_s: float, retry_after: str | None = None,
           rand: Callable[[], float] = random.random, now: float | None = None) -> float:
    """How long to wait before retry ``retry``: the server's ``Retry-After`` when it gives one,
    else ``backoff_s``; never more than ``cap_s``."""
    asked = retry_after_s(retry_after, now)
    if asked is not None:
        return min(cap_s, asked)
    return backoff_s(retry, base_s, cap_s, rand)


def scrub(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` replaced by ``***``: a server may echo a request's headers (or a
    key pasted into a field) in its error message, and every message we build may be logged."""
    if secret:
        text = text.replace(secret, "***")
    return text


def server_message(body: bytes, secret: str | None, limit: int = MESSAGE_CHARS) -> str:
    """The message of an error answer: an OpenAI-style ``{"error": {"message": ...}}`` (or
    ``{"message"}``, ``{"detail"}``), else the body's text; on one line, scrubbed, at most
    ``limit`` characters."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str) and error:
            text = error
        elif data.get("message") or data.get("detail"):
            text = str(data.get("message") or data.get("detail"))
    text = " ".join(scrub(text, secret).split()) or "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."
