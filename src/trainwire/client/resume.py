"""Where a resumed run's steps go on: the last step the server holds of it.

``log()`` without ``step=`` numbers rows one more than the last step logged. In a
script restarted to continue a run (``init(resume=...)``) that count started at 0
again, and the new points landed on the old ones. ``init()`` reads the run's summary
from the server first (``GET /api/runs/{id}``, one request, bounded by a timeout), as
the one place that knows what every earlier process of the run logged.

The request carries the run's token, so it goes only where the trainer's WebSocket
goes: straight to the server (no ``http_proxy``, which would read a plain-http
token and could not reach a loopback server anyway), and never on to a redirect's
target (urllib forwards every header, ``Authorization`` too, to any host, https
to http included).
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from typing import Any, Final
from urllib.parse import quote, urlsplit

from trainwire.client.sender import direct_opener

__all__ = ["RESUME_TIMEOUT", "last_step"]

# A resumed init() waits at most this long for the server: a refused connection
# answers at once, a network that drops packets takes it all.
RESUME_TIMEOUT: Final = 3.0

# The server URL as the client takes it (TRAINWIRE_URL may name the WebSocket).
_HTTP_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def last_step(
    server_url: str,
    token: str | None,
    run_id: str,
    *,
    rank: int | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float = RESUME_TIMEOUT,
) -> int | None:
    """The highest step the server holds of ``run_id``'s training metrics (not the
    ``system/`` ones, whose steps are seconds; with ``rank``, those the server files
    under ``rank{rank}/``), or None if it holds none.

    Raises:
        urllib.error.HTTPError: the server answered with an error (404: no such run;
            a redirect, which is not followed).
        OSError, ValueError, http.client.HTTPException: it could not be reached, or
            answered something else.
    """
    parts = urlsplit(server_url)
    scheme = _HTTP_SCHEMES.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) URL: {server_url!r}")
    base = parts._replace(scheme=scheme, query="", fragment="").geturl().rstrip("/")
    request = urllib.request.Request(
        f"{base}/api/runs/{quote(run_id, safe='')}",
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    with direct_opener(ssl_context).open(request, timeout=timeout) as response:
        body: Any = json.loads(response.read())
    prefix = "" if rank is None else f"rank{rank}/"
    steps = [
        summary["last_step"]
        for key, summary in body["summary"].items()
        if key.startswith(prefix)
        and not key[len(prefix) :].startswith("system/")
        and isinstance(summary.get("last_step"), int)
    ]
    return max(steps, default=None)
