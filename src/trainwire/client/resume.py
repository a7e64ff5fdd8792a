"""Where a resumed run's steps go on: the last step the server holds of it.

``log()`` without ``step=`` numbers rows one more than the last step logged. In a
script restarted to continue a run (``init(resume=...)``) that count started at 0
again, and the new points landed on the old ones. ``init()`` reads the run's summary
from the server first (``GET /api/runs/{id}``, one request, bounded by a timeout), as
the one place that knows what every earlier process of the run logged.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from typing import Any, Final
from urllib.parse import quote

__all__ = ["RESUME_TIMEOUT", "last_step"]

# A resumed init() waits at most this long for the server: a refused connection
# answers at once, a network that drops packets takes it all.
RESUME_TIMEOUT: Final = 3.0


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
        urllib.error.HTTPError: the server answered with an error (404: no such run).
        OSError, ValueError: it could not be reached, or answered something else.
    """
    request = urllib.request.Request(
        f"{server_url.rstrip('/')}/api/runs/{quote(run_id, safe='')}",
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    with urllib.request.urlopen(request, timeout=timeout, context=ssl_context) as response:
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
