"""The background thread that moves logged rows to the server (or to a file).

A thin shell around :class:`~trainwire.protocol.session.ClientSession`: it drains
the run's queue, pumps the session, and talks to the server over a
:class:`~trainwire.client.link.Link`. All I/O of a run happens here, on this one
thread, never on the training thread.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import random
import ssl
import threading
import time
import urllib.request
from collections import deque
from typing import Any, Final

from websockets.exceptions import ConnectionClosedError, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from trainwire.client.link import Link
from trainwire.client.notice import notice
from trainwire.client.spool import SpillingOutbox
from trainwire.client.tensors import TensorResolver
from trainwire.client.values import to_float
from trainwire.exceptions import ProtocolError
from trainwire.protocol.batching import Backoff
from trainwire.protocol.limits import STEP_MAX, STEP_MIN, key_problem
from trainwire.protocol.messages import Ack, FinishStatus, Row, Welcome
from trainwire.protocol.session import ClientSession

__all__ = ["OPEN_TIMEOUT", "LoggedRow", "Sender"]

logger = logging.getLogger("trainwire.client")

# What log() queues: (step or None, unix time, metrics). When log() saw str keys and
# float values only (the common case), that is the row as it will be sent, and it
# goes through untouched; otherwise log() appends a fourth element, False, and the
# values are checked and converted here.
LoggedRow = (
    tuple[int | None, float, dict[str, Any]] | tuple[int | None, float, dict[str, Any], bool]
)

OPEN_TIMEOUT: Final = 5.0
# A connection that stops answering (a cable pulled, a NAT entry gone, a blackholing
# firewall) is given up within PING_INTERVAL + PING_TIMEOUT seconds (5 s) and
# replaced at once: a dead link cannot complete a closing handshake, so it gets none.
PING_INTERVAL: Final = 2.0
# A loop logging faster than this many rows a second stretches the flush interval in
# proportion, up to MAX_FLUSH_INTERVAL (500 rows/s: 80 ms; 1,563 and more: 0.25 s).
# Each flush costs a fixed amount of CPU under the GIL the loop wants (the wake-up,
# the send; about 0.35 ms cold on a VM), so at 1,000 steps/s a flush every 20 ms
# costs the training thread a few percent, and one every 0.1 s still 0.3%; while
# nobody sees 0.25 s of lag on a curve that gains a thousand points a second. At or
# under this rate (100 steps/s, the latency benchmark's) nothing changes.
STRETCH_RATE: Final = 125.0
MAX_FLUSH_INTERVAL: Final = 0.25
PING_TIMEOUT: Final = 3.0
# An idle sender (a whole flush interval with nothing logged, no GPU copy pending)
# sleeps until log() wakes it, at most this long: a run that logs rarely, or is
# paused in an evaluation, costs no idle wake-ups. Each one costs the training thread about
# 0.3 ms on a VM (measured: an idle run woken 50 times a second slowed a CPU loop by
# about 1.5%).
IDLE_WAIT: Final = 1.0
# How often acks are read when nothing waits for them: each read costs CPU and the
# GIL, and unread acks only sit in the socket's buffer.
ACK_READ_INTERVAL: Final = 0.5
# The longest a live connection waits for the server's answer to its close frame.
CLOSE_TIMEOUT: Final = 1.0
# Rows the server has not acknowledged this many seconds after they were batched go
# to the run's file, with every later row until it has them all: held in memory, they
# would die with the process, and a job preempted (SIGTERM, then SIGKILL) or killed for
# its memory while the server is away lost every row since the outage, up to
# max_memory_rows. A connected server acknowledges within a flush and an ack read
# (under a second); a restart of the server takes a few seconds, which stay in memory.
SPILL_AFTER: Final = 5.0
# Rows kept in memory while the run file cannot be written (a full disk, a path made
# unwritable): tried again every pass; past this, new rows are dropped and counted.
UNWRITTEN_ROWS: Final = 100_000


class _QuietTransportLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """What websockets logs about our connection, at DEBUG. A missed pong is, for us,
    an expected event that the sender handles and reports once as a warning; at
    ERROR, with a traceback, it would land on a training script's stderr."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's own name
        return bool(self.logger.isEnabledFor(logging.DEBUG))


_transport_log: Final = _QuietTransportLog(logging.getLogger("trainwire.client.transport"), {})


def tls_context() -> ssl.SSLContext:
    """Certificates verified, against ``TRAINWIRE_CA`` when set, else the system's.

    Raises:
        OSError: ``TRAINWIRE_CA`` cannot be read, or holds no certificate.
    """
    cafile = os.environ.get("TRAINWIRE_CA") or None
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError included
        if cafile is None:
            raise
        # Named: alone, "[Errno 2] No such file or directory" read as the server's
        # fault ("server ... unreachable"), at every connection attempt.
        raise OSError(f"TRAINWIRE_CA={cafile} cannot be used: {exc.strerror or exc}") from exc


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: a request's token stays with the
    server it was meant for (urllib forwards every header to any host, https to
    http included)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def direct_opener(ssl_context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """An HTTP opener that reaches the server as the sender's WebSocket does:
    straight (no ``http_proxy``, meant for the internet: through it a server on this
    machine looked absent, and a plain-http token crossed the proxy), following no
    redirect, with ``ssl_context`` for https."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl_context),
        _NoRedirect(),
    )


class Sender(threading.Thread):
    """Delivers a run's rows until :meth:`close` and acknowledgement, or a deadline.

    Args:
        session: the protocol state; only this thread touches it once started.
        queue: rows appended by ``Run.log`` (``deque.append`` is thread-safe).
        url: the server's ingest endpoint, ``ws://host:port/ws/ingest``; None in
            offline mode, where every item goes to the session's file outbox.
        flush_interval: the longest a row waits before it is sent while the loop logs
            up to STRETCH_RATE rows a second (faster loops: see interval_for); the
            thread wakes this often, never once per ``log()`` call.
    """

    def __init__(
        self,
        session: ClientSession,
        queue: deque[LoggedRow],
        url: str | None,
        *,
        flush_interval: float = 0.02,
        token: str | None = None,
        say_new_run: bool = True,
    ) -> None:
        super().__init__(name=f"trainwire-sender-{session.run.id}", daemon=True)
        self.session = session
        self.queue = queue
        self.url = url
        self.flush_interval = flush_interval
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Whether a resuming session's welcome to a new run is said: a resume= that
        # names no run is a typo; a torchrun restart's may simply have been the first.
        self.say_new_run = say_new_run
        self.dropped_rows = 0
        self.dropped_values = 0
        self._last_step = -1
        self.refused: str | None = None
        # True once the sender, out of time with the server away, writes what it
        # holds to the run file: finish() then waits for it (Run.finish, SAVE_WAIT).
        self.saving = False
        # Rows with steps of their own (system metrics): not part of the step count.
        self.system_queue: deque[LoggedRow] = deque()
        self.tensors = TensorResolver()
        # Metric keys already checked and found good (see _checked).
        self._keys: set[str] = set()
        self._closing = threading.Event()
        self._wake = threading.Event()
        # Set as run() ends. Thread.join interrupted by Ctrl-C marks a thread still
        # running as stopped (Python <= 3.12): after one, this is what tells.
        self.ended = threading.Event()
        # True while the sender sleeps with nothing to do: Run.log() then wakes it
        # (one Event.set per idle spell, never one per call in a busy loop).
        self.idle = False
        self._finish_status: FinishStatus | None = None
        self._deadline = float("inf")
        self._warned: set[str] = set()
        self._backoff = Backoff()
        # True once a connection timed out (a server that takes connections but never
        # answers, a network that drops them): see _connect_and_pump.
        self._timed_out = False

    def wake(self) -> None:
        """Something was queued while the sender was idle: take it now."""
        self.idle = False
        self._wake.set()

    def close(self, status: FinishStatus | None, timeout: float) -> None:
        """Deliver what is left, then stop, within ``timeout`` seconds.

        Args:
            status: end the run so (queued after every row); None delivers only.
        """
        self._finish_status = status
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()

    @property
    def complete(self) -> bool:
        """Everything asked of this sender is acknowledged by the server."""
        if self._finish_status is not None:
            return self.session.done
        return self.session.delivered and not self.queue and not self.tensors.waiting

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.ended.set()

    def _run(self) -> None:
        try:
            if self.url is None:
                self._write_offline()
            else:
                self._deliver(self.url)
        finally:
            if self.url is None and self.session.queued_rows:
                # Offline, and the run file still cannot be written at the end: what
                # it could not take is gone with the process. Counted, for finish().
                self.dropped_rows += self.session.drop_newest_pending(self.session.queued_rows)
            outbox = self.session.outbox
            if isinstance(outbox, SpillingOutbox):
                if self.url is not None and not self.complete:
                    # Out of time with the server away (or refusing us): keep every
                    # undelivered row on disk, for `trainwire sync`.
                    self.saving = True
                    if self._closing.is_set():
                        self._drain_retrying()
                    try:
                        outbox.persist()
                    except Exception as exc:  # the thread's last act: say so, not a traceback
                        logger.warning(
                            "trainwire could not write run %s to %s: %s",
                            self.session.run.id,
                            outbox.path,
                            exc,
                        )
                    # What the file could not take (a full disk) ends with this thread:
                    # counted as dropped, not said by finish() to be kept for sync.
                    self.dropped_rows += outbox.forget_held()
                    self.dropped_rows += self.session.drop_newest_pending(self.session.queued_rows)
                outbox.close()

    def _write_offline(self) -> None:
        interval, last_drain, rows = self.flush_interval, time.monotonic(), 0
        while not self._closing.is_set():
            if rows == 0 and self._nothing_to_do():  # a whole interval with nothing
                self._sleep_until_logged()
            else:
                self._wait(interval)
            now = time.monotonic()
            rows = self._drain_retrying()
            # Stretched like a connected sender's: each pass writes to the file and
            # costs the loop a wake-up (a fast loop: 9% slower at 50 passes a second).
            interval = self.pace(rows, now - last_drain)
            last_drain = now
        self._drain_retrying()

    def _drain_retrying(self) -> int:
        """:meth:`_drain` where the rows may go to the run file (offline, the server
        away, or a backlog past the memory bound): a write that fails must not end the
        thread, which would silently drop every later row. The rows stay queued in the
        session and are written at a later pass; the failure is said once."""
        try:
            return self._drain()
        except Exception as exc:  # OSError mostly; anything else is as fatal to the run
            outbox = self.session.outbox
            self._warn_once(
                "write",
                "trainwire could not write run %s to %s (%s); retrying",
                self.session.run.id,
                getattr(outbox, "path", "?"),
                exc,
            )
            excess = self.session.queued_rows - UNWRITTEN_ROWS
            if excess > 0:  # the newest rows, as when the file reaches its bound
                self.dropped_rows += self.session.drop_newest_pending(excess)
            return 0

    def _deliver(self, url: str) -> None:
        while not self._finished():
            try:
                self._connect_and_pump(url)
                if self._finished():
                    return
            except InvalidStatus as exc:
                self.session.connection_lost()
                self._warn_once("status", "trainwire server %s refused: %s; retrying", url, exc)
            except ConnectionClosedError as exc:
                self.session.connection_lost()
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in (4401, 4403):
                    # A token refused will be refused again: say so, and let finish()
                    # end without waiting out its timeout; the rows stay on disk.
                    self.refused = exc.rcvd.reason if exc.rcvd is not None else "refused"
                if code is not None and code >= 4000:
                    # Refused by the server (a token, a limit, a version): say why.
                    reason = exc.rcvd.reason if exc.rcvd is not None else ""
                    self._warn_once(f"close:{code}", "trainwire server %s refused: %s", url, reason)
                elif code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART):
                    # `trainwire stop`, a restart, a deploy: nothing is wrong here.
                    self._warn_once(
                        "connect",
                        "trainwire server %s went away (%s); rows are kept and sent "
                        "when it is back",
                        url,
                        CloseCode(code).name.lower().replace("_", " "),
                    )
                else:
                    self._warn_once(
                        "connect", "trainwire server %s unreachable (%s); retrying", url, exc
                    )
            except (OSError, TimeoutError, WebSocketException, ProtocolError) as exc:
                self.session.connection_lost()
                self._warn_once(
                    "connect", "trainwire server %s unreachable (%s); retrying", url, exc
                )
            except Exception:  # the one place errors stop: training must never see them
                self.session.connection_lost()
                logger.exception("trainwire sender error; retrying")
            self._wait_to_retry(self._backoff.next_delay(random.random))

    def _wait_to_retry(self, delay: float) -> None:
        # Keep draining while waiting: the queue holds the user's objects (a loss
        # tensor keeps its autograd graph alive) until they are converted to floats,
        # and rows beyond the memory bound must reach the spill file. Paced as a
        # connected sender's flushes are (interval_for), and IDLE_WAIT apart while
        # nothing is logged: a server away, or refusing our token, must not cost a
        # fast loop a wake-up every flush_interval (measured by turns on a 1,300
        # steps/s loop: +3.6% with the server refusing, against +2.7% connected).
        # Event.wait, not sleep: close() wakes a waiting sender at once.
        now = time.monotonic()
        until = now + min(delay, self._time_left())
        interval, last_drain = self.flush_interval, now
        self._spill_stale(now)
        while (left := until - now) > 0:
            if self._wake.wait(min(left, interval)):
                self._wake.clear()  # woken once by close(); later waits back off again
                return
            now = time.monotonic()
            rows = self._drain_retrying()
            interval = self.pace(rows, now - last_drain) if rows else IDLE_WAIT
            last_drain = now
            self._spill_stale(now)

    def _spill_stale(self, now: float, ws: Link | None = None) -> None:
        """Rows unacknowledged for SPILL_AFTER seconds go to the run's file (see there).
        A failed write leaves them in memory, said once, and is tried again next pass.
        ``ws``: the connection, whose acks are read first."""
        outbox = self.session.outbox
        if not isinstance(outbox, SpillingOutbox):
            return
        since = outbox.held_since
        if since is None or now - since < SPILL_AFTER:
            return
        if ws is not None:
            # Their acks may wait unread in the socket's buffer: a sender that did not
            # run for seconds (its process stopped and continued, a VM paused, the GIL
            # held by a long call) wrote every row it held to disk, with the server
            # fine, and said it had not confirmed them.
            self._receive(ws, 0.0)
            since = outbox.held_since
            if since is None or now - since < SPILL_AFTER:
                return
        try:
            outbox.spill_held()
        except Exception as exc:  # OSError mostly: as _drain_retrying's
            self._warn_once(
                "write",
                "trainwire could not write run %s to %s (%s); retrying",
                self.session.run.id,
                outbox.path,
                exc,
            )
            return
        self._warn_once(
            "spill",
            "trainwire: server %s has not confirmed rows for %g s: writing them to %s "
            "until it does (a process killed meanwhile leaves them there for "
            "`trainwire sync`)",
            self.url,
            SPILL_AFTER,
            outbox.path,
        )

    def _connect_and_pump(self, url: str) -> None:
        # Retrying: rows the run file could not take (a full disk) stay queued, and a
        # failure here, taken for the server's, kept the sender from ever connecting
        # again, when only the server's acks could empty the file.
        self._drain_retrying()
        # Once closing, no longer than the time left (finish() waits out the rest).
        open_timeout = min(OPEN_TIMEOUT, max(self._time_left(), 0.1))
        if self._timed_out:
            # The last connection timed out, and so may this attempt, blocked for
            # open_timeout with nothing drained or moved to the file: rows that would
            # be SPILL_AFTER old by then go now. (Left in memory, a trainer killed
            # during the attempt lost up to SPILL_AFTER + OPEN_TIMEOUT seconds of rows.)
            self._spill_stale(time.monotonic() + open_timeout)
        try:
            link = Link.open(
                url,
                self.headers,
                ssl_context=tls_context() if url.startswith("wss:") else None,
                open_timeout=open_timeout,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                logger=_transport_log,
            )
        except TimeoutError:
            self._timed_out = True
            raise
        self._timed_out = False
        try:
            self._pump(link)
        except TimeoutError:  # no pong, or a send that made no progress: a dead link
            self._timed_out = True
            raise
        finally:
            link.close()

    def _pump(self, ws: Link) -> None:
        ws.send(self.session.connection_made())
        next_flush = last_drain = next_ack_read = time.monotonic()
        while True:
            now = time.monotonic()
            idle = False
            if now >= next_flush or self._closing.is_set():
                # Rows are taken once per flush interval, not once per ack: every pass
                # holds the GIL that the training thread wants. (A spill that fails to
                # write is no reason to drop a working connection.)
                rows = self._drain_retrying()
                next_flush = now + self.pace(rows, now - last_drain)
                last_drain = now
                idle = rows == 0  # a whole interval with nothing logged
                self._spill_stale(now, ws)  # connected, but the server not answering
            # After an ack this only refills the window (a backlog being replayed).
            # Rows are cut by the drain, which retries a write that fails: cut here,
            # the failure (a full disk) ended every connection before it sent what
            # the outbox held, whose acks alone could empty the run file.
            for frame in self.session.frames_to_send(cut=False):
                ws.send(frame)
            if self._finished():
                return
            # Unless progress needs the server now (its welcome, acks for a backlog,
            # the run's end), acks are read without waiting, every ACK_READ_INTERVAL,
            # and the sender sleeps until the next flush rather than wake for each:
            # a wake-up costs CPU and the GIL (about 0.1 ms on a VM).
            ws.keepalive()
            wake_at = min(next_flush, ws.next_deadline())
            if self.session.awaiting_server or self._closing.is_set():
                self._receive(ws, max(0.0, wake_at - time.monotonic()))
                continue
            if now >= next_ack_read:
                self._receive(ws, 0.0)
                next_ack_read = now + ACK_READ_INTERVAL
            if idle and self._nothing_to_do():
                # Woken by a row, it is sent at the next flush time, or at once if
                # that has passed: the pacing of a busy loop is unchanged.
                self._sleep_until_logged(ws.next_deadline() - time.monotonic())
            else:
                self._wait(wake_at - time.monotonic())

    def _nothing_to_do(self) -> bool:
        return not (self.queue or self.system_queue or self.tensors.waiting)

    def _sleep_until_logged(self, most: float = IDLE_WAIT) -> None:
        """Sleep until log() queues a row (or close()), at most IDLE_WAIT (or
        ``most``: the connection's next keepalive)."""
        self._wake.clear()
        self.idle = True
        # Checked after idle is set: a row queued before log() could see the flag
        # is found here, one queued after it gets its wake-up. (Both: a spare wake.)
        if self._nothing_to_do() and not self._closing.is_set():
            self._wake.wait(max(0.0, min(IDLE_WAIT, most)))
        self.idle = False
        if not self._closing.is_set():
            self._wake.clear()

    def _wait(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds; close() ends it at once."""
        if self._wake.wait(max(0.0, timeout)) and not self._closing.is_set():
            # A late wake() from a log() that saw the sender idle just before it
            # woke on its own: spent, so that the next wait sleeps again.
            self._wake.clear()

    def _receive(self, ws: Link, timeout: float) -> None:
        """Apply every server frame that arrives within ``timeout`` (0: those here)."""
        for data in ws.receive(timeout):
            if isinstance(data, str):
                raise ProtocolError("server sent a text frame")
            message = self.session.receive_frame(data)
            self._backoff.reset()
            if (
                type(message) is Welcome
                and message.new_run
                and self.session.resume
                and self.say_new_run
            ):
                self._warn_once(
                    "resume",
                    "trainwire: resume=%r names no run on %s: it starts as a new run",
                    self.session.run.id,
                    self.url,
                )
            if type(message) is Welcome and "connect" in self._warned:
                # Said as the outage was: once each, so that a user watching the
                # training's output knows it recovered (and hears of the next one).
                self._warned.discard("connect")
                notice(logger, "trainwire: reconnected to %s; sending what was held", self.url)
            if type(message) is Ack and message.refused:
                # Past the run's key limit, which the run's other writers count
                # towards too: stop sending these keys (see _take_key).
                self._keys.difference_update(message.refused)
                self._warn_once(
                    "refused",
                    "trainwire: run %s has the most metric keys the server allows; "
                    "values of %s and of any other new key are not stored",
                    self.session.run.id,
                    ", ".join(map(repr, message.refused[:3])),
                )

    def pace(self, rows: int, seconds: float) -> float:
        """The wait before the next drain, after one that took ``rows`` logged over
        ``seconds``: the connected, retrying and offline senders all pace so."""
        return self.interval_for(rows / max(seconds, 1e-3))

    def interval_for(self, rate: float) -> float:
        """The wait before the next flush, for a loop logging ``rate`` rows a second:
        ``flush_interval`` up to STRETCH_RATE, then in proportion to the rate, up to
        MAX_FLUSH_INTERVAL (never below ``flush_interval``)."""
        if rate <= STRETCH_RATE:
            return self.flush_interval
        stretched = self.flush_interval * rate / STRETCH_RATE
        return max(self.flush_interval, min(stretched, MAX_FLUSH_INTERVAL))

    def continue_after(self, step: int) -> None:
        """Number rows logged without a step from ``step + 1`` (a resumed run's last
        step). Before :meth:`start` only: the thread owns the count once started."""
        self._last_step = step

    def _drain(self) -> int:
        """Convert and queue what was logged; returns how many ``log()`` rows it took."""
        # Read before the queue is drained: finish() sets it after the user's last
        # log() returned, so once it is seen, every row of the run is in the queue.
        closing = self._closing.is_set()
        queue = self.queue
        logged: list[Row] = []
        append = logged.append
        last_step = self._last_step
        # True while log() vouched for every row (str keys, float values): such rows
        # go as they are, in one pass. This loop holds the GIL the training thread
        # wants, for every row: it touches nothing but the row's tuple.
        plain = True
        while queue:
            row = queue.popleft()
            step = row[0]
            marked = len(row) != 3  # log() left values to check or convert
            if marked:
                plain = False
            if type(step) is not int:
                # "One more than the last step logged", in the order of the log() calls.
                if step is None:
                    step = last_step + 1
                else:
                    step = _integer(step)
                    if step is None:
                        self.dropped_rows += 1
                        self._warn_once(
                            "step", "trainwire dropped a row: step %r is not an integer", row[0]
                        )
                        continue
                marked = True  # rebuilt below with its step
            if marked:
                row = (step, row[1], row[2])
            last_step = step
            append(row)  # type: ignore[arg-type]  # step is an int by now
        self._last_step = last_step
        taken = len(logged)
        # The sampler's rows are plain by construction (floats it made itself).
        while self.system_queue:
            append(self.system_queue.popleft())  # type: ignore[arg-type]
        if plain and not self.tensors.waiting:
            self._add(logged)
        else:
            self._convert(logged, closing)
        if closing and self._finish_status is not None:
            self.session.finish(self._finish_status)
        self._cut()
        return taken

    def _convert(self, logged: list[Row], closing: bool) -> None:
        """Rows with tensors or other values to convert, in order, through the
        tensor resolver (GPU values once their copies are done)."""
        if logged:
            self.tensors.submit(logged)
        rows: list[Row] = []
        ready = self.tensors.ready(wait=closing)
        for key in self.tensors.take_changed():
            self.dropped_values += 1
            self._warn_once(
                f"changed:{key}",
                "trainwire dropped a value of %r: its tensor was changed in place after "
                "log(), before it could be read; log a copy (t.detach().clone()) of a "
                "tensor you change in place",
                key,
            )
        for step, at, metrics in ready:
            if _is_plain(metrics):  # goes as it is: log() made this dict
                rows.append((step, at, metrics))
                continue
            values: dict[str, float] = {}
            for key, raw in metrics.items():
                name = _key_name(key)
                value = None if name is None else to_float(raw)
                if value is None:
                    self.dropped_values += 1
                    self._warn_once(
                        f"value:{name}",
                        "trainwire dropped the value of %s: %s",
                        "a key" if name is None else repr(name),
                        _not_a_number(raw)
                        if name is not None
                        else f"its {type(key).__name__} key cannot be made a string",
                    )
                    continue
                values[name] = value  # type: ignore[index]  # name is a str here
            if values:
                rows.append((step, at, values))
        self._add(rows)

    def _add(self, rows: list[Row]) -> None:
        if rows:
            if self.session.finishing:
                self.dropped_rows += len(rows)  # logged by another thread during finish()
            else:
                self.session.add_rows(self._checked(rows))

    def _checked(self, rows: list[Row]) -> list[Row]:
        """``rows`` as the server takes them: a step outside 64 bits drops its row, a
        key the server would refuse (empty, too long, control characters, one too
        many) drops its value, each counted and said once. Sent, either would make the
        server refuse the whole batch, and every batch after it, at every reconnect."""
        known = self._keys
        for step, _, values in rows:  # the common case: one pass, nothing rebuilt
            if not (STEP_MIN <= step <= STEP_MAX and known.issuperset(values)):
                break
        else:
            return rows
        kept: list[Row] = []
        for row in rows:
            step, at, values = row
            if not STEP_MIN <= step <= STEP_MAX:
                self.dropped_rows += 1
                self._warn_once(
                    "step", "trainwire dropped a row: step %r is outside 64-bit integers", step
                )
                continue
            if not known.issuperset(values):
                refused = [key for key in values if not self._take_key(key)]
                if refused:
                    values = {k: v for k, v in values.items() if k not in refused}
                    if not values:
                        continue
                    row = (step, at, values)
            kept.append(row)
        return kept

    def _take_key(self, key: str) -> bool:
        """True if ``key`` is known or a new key the server takes (then known)."""
        if key in self._keys:
            return True
        if key in self.session.refused_keys:  # see _receive: the run has its most keys
            self.dropped_values += 1
            return False
        problem = key_problem(key, len(self._keys))
        if problem is not None:
            self.dropped_values += 1
            self._warn_once(f"key:{problem}", "trainwire dropped the value of %r: %s", key, problem)
            return False
        self._keys.add(key)
        return True

    def _cut(self) -> None:
        outbox = self.session.outbox
        was_spilling = isinstance(outbox, SpillingOutbox) and outbox.spilling
        if not self.session.cut_batches():
            # The run file is at its bound: the rows that do not fit are dropped and
            # counted, newest first, so that the stream keeps no gap.
            dropped = self.session.drop_oldest_pending(self.session.queued_rows)
            self.dropped_rows += dropped
            self._warn_once(
                "full",
                "trainwire: the run file %s reached its bound (max_disk_bytes=%d): "
                "dropping new points; the count is reported at finish()",
                getattr(outbox, "path", "?"),
                getattr(outbox, "disk_bytes", 0),
            )
            self.session.cut_batches()  # the run's end still fits: it has no rows
        if isinstance(outbox, SpillingOutbox) and outbox.spilling and not was_spilling:
            if not outbox.keep:
                self._warn_once(
                    "spill",
                    "trainwire: server unreachable and %d rows held in memory: "
                    "spilling to %s until it is back",
                    outbox.memory_rows,
                    outbox.path,
                )

    def _finished(self) -> bool:
        if not self._closing.is_set():
            return False
        return self.complete or self._time_left() <= 0 or self.refused is not None

    def _time_left(self) -> float:
        return self._deadline - time.monotonic()

    def _warn_once(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)


def _integer(step: object) -> int | None:
    """A logged step as an int: numpy and torch integers, and floats with no fraction
    (``step=epoch * 1.0``, a numpy float64); None for 1.5, NaN or anything else.
    A user's object may raise anything: it costs its own row, not the drain's rows."""
    try:
        return operator.index(step)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001, S110 - TypeError mostly: not an integer type
        pass
    if isinstance(step, (str, bytes)):
        return None  # "3" is a name, not a step
    try:
        number = float(step)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - TypeError, ValueError; a tensor's RuntimeError
        return None
    return int(number) if number.is_integer() else None


def _not_a_number(raw: object) -> str:
    """Why a logged value is no number, in the user's terms."""
    if isinstance(raw, int):  # 2**2000: float() overflows
        return "int too large for a float"
    try:  # a tensor or an array of several numbers: log one (loss.mean()), or each
        shape = getattr(raw, "shape", None)
        if shape is not None and math.prod(shape) != 1:
            return f"{type(raw).__name__} of shape {list(shape)} is not one number"
    except Exception:  # noqa: BLE001, S110 - a user's object: its type says enough
        pass
    return f"{type(raw).__name__} is not a number"


def _key_name(key: object) -> str | None:
    """A logged key as a metric key (7 -> "7"); None if it cannot be made one: its
    ``__str__`` raised. One user object must cost its own value, not the drain it
    came in (every row logged in the same flush interval), which it did."""
    if type(key) is str:
        return key
    try:
        return str(key)
    except Exception:  # noqa: BLE001 - whatever a user's object raises
        return None


def _is_plain(metrics: dict[Any, Any]) -> bool:
    """str keys and float values only: a row that needs no conversion."""
    for key, raw in metrics.items():
        if type(raw) is not float or type(key) is not str:
            return False
    return True
