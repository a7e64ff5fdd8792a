"""The background thread that moves logged rows to the server.

A thin shell around :class:`~trainwire.protocol.session.ClientSession`: it drains
the run's queue, pumps the session, and talks to the server with the
``websockets`` sync client. All I/O of a run happens here, never on the
training thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Any, Final

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from trainwire.client.values import to_float
from trainwire.exceptions import ProtocolError
from trainwire.protocol.batching import Backoff
from trainwire.protocol.messages import FinishStatus, Row
from trainwire.protocol.session import ClientSession

__all__ = ["LoggedRow", "Sender"]

logger = logging.getLogger("trainwire.client")

# (step, unix time, metrics as the user passed them): converted to floats here.
LoggedRow = tuple[int, float, dict[str, Any]]

_OPEN_TIMEOUT: Final = 5.0
# A connection that stops answering (a cable pulled, a NAT entry gone, a blackholing
# firewall) is noticed within PING_INTERVAL + PING_TIMEOUT seconds and replaced.
PING_INTERVAL: Final = 2.0
PING_TIMEOUT: Final = 4.0


class Sender(threading.Thread):
    """Delivers a run's rows until :meth:`close` and acknowledgement, or a deadline.

    Args:
        session: the protocol state; only this thread touches it once started.
        queue: rows appended by ``Run.log`` (``deque.append`` is thread-safe).
        url: the server's ingest endpoint, ``ws://host:port/ws/ingest``.
        flush_interval: the longest a row waits before it is sent; the thread wakes
            this often, never once per ``log()`` call.
        max_pending_rows: rows held while the server is unreachable; beyond it the
            oldest are dropped, counted, and reported in one warning.
    """

    def __init__(
        self,
        session: ClientSession,
        queue: deque[LoggedRow],
        url: str,
        *,
        flush_interval: float = 0.02,
        max_pending_rows: int = 1_000_000,
    ) -> None:
        super().__init__(name=f"trainwire-sender-{session.run.id}", daemon=True)
        self.session = session
        self.queue = queue
        self.url = url
        self.flush_interval = flush_interval
        self.max_pending_rows = max_pending_rows
        self.dropped_rows = 0
        self.dropped_values = 0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._finish_status: FinishStatus = "finished"
        self._deadline = float("inf")
        self._warned: set[str] = set()
        self._backoff = Backoff()

    def close(self, status: FinishStatus, timeout: float) -> None:
        """Finish the run, deliver what is left, and stop within ``timeout`` seconds."""
        self._finish_status = status
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()

    def run(self) -> None:
        while not self._finished():
            try:
                self._connect_and_pump()
                if self.session.done:
                    return
            except (OSError, TimeoutError, WebSocketException, ProtocolError) as exc:
                self.session.connection_lost()
                self._warn_once(
                    "connect", "trainwire server %s unreachable (%s); retrying", self.url, exc
                )
            except Exception:  # the one place errors stop: training must never see them
                self.session.connection_lost()
                logger.exception("trainwire sender error; retrying")
            self._wait_to_retry(self._backoff.next_delay(random.random))

    def _wait_to_retry(self, delay: float) -> None:
        # Keep draining while waiting: the queue holds the user's objects (a loss
        # tensor keeps its autograd graph alive) until they are converted to floats.
        # Event.wait, not sleep: close() wakes a waiting sender at once.
        until = time.monotonic() + min(delay, self._time_left())
        while (left := until - time.monotonic()) > 0:
            if self._wake.wait(min(left, self.flush_interval)):
                self._wake.clear()  # woken once by close(); later waits back off again
                return
            self._drain()

    def _connect_and_pump(self) -> None:
        self._drain()
        with connect(
            self.url,
            open_timeout=_OPEN_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=PING_TIMEOUT,
            max_size=None,
            compression=None,
        ) as ws:
            self._pump(ws)

    def _pump(self, ws: ClientConnection) -> None:
        ws.send(self.session.connection_made())
        while True:
            self._drain()
            for frame in self.session.frames_to_send():
                ws.send(frame)
            if self.session.done or self._time_left() <= 0:
                return
            try:
                data = ws.recv(timeout=self.flush_interval)
            except TimeoutError:
                continue
            if isinstance(data, str):
                raise ProtocolError("server sent a text frame")
            self.session.receive_frame(data)
            self._backoff.reset()

    def _drain(self) -> None:
        rows: list[Row] = []
        while self.queue:
            step, at, metrics = self.queue.popleft()
            values: dict[str, float] = {}
            for key, raw in metrics.items():
                value = to_float(raw)
                if value is None:
                    self.dropped_values += 1
                    self._warn_once(
                        f"value:{key}",
                        "trainwire dropped the value of %r: %r is not a number",
                        key,
                        type(raw).__name__,
                    )
                    continue
                values[str(key)] = value
            if values:
                rows.append((step, at, values))
        if rows:
            self.session.add_rows(rows)
        excess = self.session.pending_rows - self.max_pending_rows
        if excess > 0:
            self.dropped_rows += self.session.drop_oldest_pending(excess)
            self._warn_once(
                "overflow",
                "trainwire server unreachable and %d rows waiting: dropping the oldest "
                "(max_pending_rows); the count is reported at finish()",
                self.max_pending_rows,
            )
        if self._closing.is_set():
            self.session.finish(self._finish_status)

    def _finished(self) -> bool:
        return self.session.done or (self._closing.is_set() and self._time_left() <= 0)

    def _time_left(self) -> float:
        return self._deadline - time.monotonic()

    def _warn_once(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)
