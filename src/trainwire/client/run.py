"""``init`` / ``log`` / ``finish``: the API a training script calls.

``Run.log`` is the hot path: it stamps the row and appends it to a queue, and
nothing else. Converting values, batching and every byte of I/O happen on the
sender thread. Nothing here raises into the training loop after ``init``.
"""

from __future__ import annotations

import enum
import logging
import os
import platform
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote, urlsplit

import msgspec

from trainwire import __version__
from trainwire.client.local import ensure_local_server
from trainwire.client.sender import LoggedRow, Sender
from trainwire.exceptions import ConfigError
from trainwire.protocol.messages import FinishStatus, RunSpec
from trainwire.protocol.session import ClientSession
from trainwire.settings import DEFAULT_PORT, default_data_dir

__all__ = ["Run", "RunState", "finish", "init", "log"]

logger = logging.getLogger("trainwire.client")

DEFAULT_FINISH_TIMEOUT: Final = 30.0


class RunState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"


class Run:
    """One training run, streaming to a trainwire server.

    Made by :func:`trainwire.init`; use it as a context manager, or call
    :meth:`finish` at the end.

    Attributes:
        id: the run's id, chosen here so that it is known before the server answers.
        url: the dashboard page of this run.
    """

    def __init__(
        self,
        spec: RunSpec,
        server_url: str,
        *,
        flush_interval: float = 0.02,
        max_pending_rows: int = 1_000_000,
    ) -> None:
        self.id = spec.id
        self.project = spec.project
        self.name = spec.name
        self.config = spec.config
        self.server_url = server_url.rstrip("/")
        self.url = f"{self.server_url}/?run={quote(self.id)}"
        self.state = RunState.RUNNING
        self._next_step = 0
        self._dropped_calls = 0
        self._warned_closed = False
        self._queue: deque[LoggedRow] = deque()
        self._lock = threading.Lock()
        session = ClientSession(spec, client=f"trainwire-python/{__version__}")
        self._sender = Sender(
            session,
            self._queue,
            _ingest_url(self.server_url),
            flush_interval=flush_interval,
            max_pending_rows=max_pending_rows,
        )
        self._sender.start()

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record metrics at a step. Returns at once and never raises.

        Args:
            metrics: metric key -> value: Python numbers, numpy scalars, or 0-d
                tensors on any device (converted off the training thread).
            step: the step; if omitted, one more than the last step logged.
        """
        try:
            if self.state is not RunState.RUNNING:
                if not self._warned_closed:
                    self._warned_closed = True
                    logger.warning("run %s is finished: log() calls are ignored", self.id)
                return
            # A copy: the caller may reuse and mutate its dict after log() returns.
            values = dict(metrics)
            if step is None:
                step = self._next_step
            self._next_step = step + 1
            self._queue.append((step, time.time(), values))
        except Exception:  # the training loop's boundary: count, warn once, go on
            self._dropped_calls += 1
            if self._dropped_calls == 1:
                logger.warning("trainwire could not record a log() call", exc_info=True)

    def finish(
        self, timeout: float = DEFAULT_FINISH_TIMEOUT, *, status: FinishStatus = "finished"
    ) -> None:
        """End the run: deliver what was logged, then mark the run finished.

        Idempotent. Waits at most ``timeout`` seconds for the server to acknowledge.
        """
        with self._lock:
            if self.state is RunState.FINISHED:
                return
            self.state = RunState.FINISHED
        try:
            self._sender.close(status, timeout)
            self._sender.join(timeout + 1.0)
            left = self._sender.session.pending_rows + len(self._queue)
            if not self._sender.session.done:
                logger.warning(
                    "trainwire: run %s not confirmed by %s within %g s; %d rows undelivered",
                    self.id,
                    self.server_url,
                    timeout,
                    left,
                )
            if self._sender.dropped_rows:
                logger.warning(
                    "trainwire: %d rows of run %s were dropped while the server was unreachable",
                    self._sender.dropped_rows,
                    self.id,
                )
        except Exception:  # finish() is called from the training script: never raise
            logger.warning("trainwire could not finish run %s cleanly", self.id, exc_info=True)

    @property
    def delivered(self) -> bool:
        """True once the server has stored everything, including the run's end."""
        return self._sender.session.done

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(status="finished" if exc is None else "crashed")

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.project}/{self.name} {self.state.value}>"


def _ingest_url(server_url: str) -> str:
    parts = urlsplit(server_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"TRAINWIRE_URL must start with http:// or https://, not {server_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/ingest"


def _plain_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    # Config values travel as msgpack and are stored as JSON: anything else
    # (a torch.device, a Path) is kept as its str().
    if not config:
        return {}
    plain: dict[str, Any] = msgspec.to_builtins(dict(config), enc_hook=str, str_keys=True)
    return plain


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


_current: Run | None = None


def init(
    project: str = "default",
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    url: str | None = None,
    flush_interval: float = 0.02,
) -> Run:
    """Start a run and its background sender.

    Args:
        project: groups runs in the dashboard.
        name: the run's display name; a generated one if omitted.
        config: hyper-parameters, shown with the run.
        url: the server, ``http(s)://host:port``; else ``TRAINWIRE_URL``; else the
            user's local server, started in the background if none answers.
        flush_interval: the longest a logged point waits before it is sent.

    Returns:
        the run; also the target of :func:`trainwire.log` and :func:`trainwire.finish`.

    Raises:
        ConfigError: ``url`` is not an http(s) URL.
        TransientError: no local server could be started (only when none is given).
    """
    global _current
    run_id = _new_run_id()
    spec = RunSpec(
        id=run_id,
        project=project,
        name=name or f"{platform.node()}-{run_id}",
        config=_plain_config(config),
    )
    server = url or os.environ.get("TRAINWIRE_URL")
    if not server:
        port = int(os.environ.get("TRAINWIRE_PORT", DEFAULT_PORT))
        server = ensure_local_server(default_data_dir(), port=port)
    _ingest_url(server)  # validate before starting a thread
    run = Run(spec, server, flush_interval=flush_interval)
    _current = run
    return run


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """:meth:`Run.log` on the run of the last :func:`init`."""
    if _current is None:
        raise ConfigError("call trainwire.init() before trainwire.log()")
    _current.log(metrics, step)


def finish(timeout: float = DEFAULT_FINISH_TIMEOUT) -> None:
    """:meth:`Run.finish` on the run of the last :func:`init`; does nothing without one."""
    if _current is not None:
        _current.finish(timeout)
