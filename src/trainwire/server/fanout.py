"""Fan-out to dashboards: one bounded queue per browser, catch-up from storage.

A dashboard never slows ingest or another dashboard. Bus handlers only append to
this connection's queue; when the queue is full it is dropped whole, and the
connection is caught up from storage, which already holds every point, once the
browser reads again. Sequence numbers make every path gap-free and duplicate-free:
a live event is forwarded only if it starts exactly where the last frame sent for
that run ended (``prev_seq``); anything else is answered from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from trainwire.exceptions import ProtocolError, StorageError
from trainwire.protocol.columns import spelled
from trainwire.protocol.limits import run_id_problem
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    DashboardError,
    DashboardHello,
    DashboardIn,
    Points,
    RunInfo,
    RunUpdate,
    Subscribe,
    Unsubscribe,
    decode_dashboard_message,
    encode_json,
)
from trainwire.server.bus import Bus, BusEvent, PointsCommitted, RunChanged
from trainwire.server.catchup import parts
from trainwire.storage import Store
from trainwire.storage.base import CommittedColumns

__all__ = ["DashboardFeed", "Followers", "serve_dashboard"]

logger = logging.getLogger("trainwire.server")

# A run's points committed after a seq, with the run's seq at the read (see catchup).
ReadMetrics = Callable[[str, int], Awaitable[tuple[int, dict[str, CommittedColumns]]]]
SendFrame = Callable[[bytes], Awaitable[None]]

DEFAULT_MAX_QUEUED: Final = 1024
# What one dashboard may ask of the server: each followed run costs a catch-up read
# and a place in every commit's fan-out; each command waits in memory until done.
MAX_FOLLOWED: Final = 1000
MAX_PENDING_COMMANDS: Final = 10_000
# Frames are shared by every dashboard, but a stalled one keeps its queue's alive:
# bounded in bytes too, or 1024 large batches would pin gigabytes for one browser.
DEFAULT_MAX_QUEUED_BYTES: Final = 64 << 20


class Followers:
    """The runs some dashboard of this process follows.

    Ingest builds a run's JSON ``points`` frame only for these: nobody watching, no
    frame (a measurable share of ingest time). A dashboard that subscribes between
    that check and the commit gets an event with no frame, and catches up from
    storage instead. With several server processes (a Redis bus), a run followed
    only elsewhere is caught up from storage there; correct, if slower.
    """

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()

    def add(self, run_id: str) -> None:
        self._count[run_id] += 1

    def remove(self, run_id: str) -> None:
        self._count[run_id] -= 1
        if self._count[run_id] <= 0:
            del self._count[run_id]

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._count


class DashboardFeed:
    """What one browser is sent.

    Args:
        read_metrics: ``(run_id, after) -> (last_seq, series)`` from storage.
        send: writes one JSON frame to the browser; may wait on a slow socket.
        max_queued: live events held for this browser before falling back to
            catch-up from storage.
    """

    def __init__(
        self,
        read_metrics: ReadMetrics,
        send: SendFrame,
        max_queued: int = DEFAULT_MAX_QUEUED,
        followers: Followers | None = None,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._followers = followers if followers is not None else Followers()
        self._following: set[str] = set()
        self._read_metrics = read_metrics
        self._send = send
        self._max_queued = max_queued
        self._last_sent: dict[str, int] = {}  # run id -> seq of the last points frame sent
        self._events: deque[PointsCommitted] = deque()
        self._run_updates: dict[str, RunInfo] = {}
        self._commands: deque[DashboardIn] = deque()
        self._overflowed = False
        self._wake = asyncio.Event()
        self.overflows = 0

    # -- input (never blocks) -------------------------------------------------------

    def on_event(self, event: BusEvent) -> None:
        """Bus handler."""
        match event:
            case PointsCommitted(run_id=run_id):
                if run_id not in self._last_sent:
                    return
                if (
                    len(self._events) >= self._max_queued
                    or self._queued_bytes + len(event.frame) > self._max_queued_bytes
                ):
                    self._events.clear()
                    self._queued_bytes = 0
                    self._overflowed = True
                    self.overflows += 1
                else:
                    self._events.append(event)
                    self._queued_bytes += len(event.frame)
            case RunChanged(run=run):
                # Coalesced: only a run's latest state matters.
                self._run_updates[run.id] = run
        self._wake.set()

    def command(self, message: DashboardIn) -> None:
        """A message from the browser.

        Raises:
            ProtocolError: a run id no run can have, past MAX_FOLLOWED runs followed,
                or MAX_PENDING_COMMANDS not yet carried out (the browser gets the
                error; nothing changes).
        """
        if len(self._commands) >= MAX_PENDING_COMMANDS:
            raise ProtocolError(f"more than {MAX_PENDING_COMMANDS} commands waiting")
        # Ingest refuses such an id, so no run has it. And each id followed is kept
        # (and echoed in a frame): 1,000 follows of ids of megabytes each took
        # gigabytes, from one read-only share link.
        problem = run_id_problem(message.run)
        if problem is not None:
            raise ProtocolError(problem)
        match message:
            case Subscribe() if (
                message.run not in self._following and len(self._following) >= MAX_FOLLOWED
            ):
                raise ProtocolError(f"a dashboard follows at most {MAX_FOLLOWED} runs")
            case Subscribe(run=run_id) if run_id not in self._following:
                self._following.add(run_id)
                self._followers.add(run_id)
            case Unsubscribe(run=run_id) if run_id in self._following:
                self._following.discard(run_id)
                self._followers.remove(run_id)
        self._commands.append(message)
        self._wake.set()

    def close(self) -> None:
        """The browser is gone: it follows nothing any more."""
        for run_id in self._following:
            self._followers.remove(run_id)
        self._following.clear()

    # -- output ---------------------------------------------------------------------

    async def run(self) -> None:
        """Send to the browser until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.pump()

    async def pump(self) -> None:
        """Send everything due now."""
        while self._commands:
            match self._commands.popleft():
                case Subscribe(run=run_id, after=after):
                    self._last_sent[run_id] = after
                    await self._catch_up(run_id, snapshot=after == 0)
                case Unsubscribe(run=run_id):
                    self._last_sent.pop(run_id, None)
        if self._overflowed:
            self._overflowed = False
            self._events.clear()
            self._queued_bytes = 0
            for run_id in list(self._last_sent):
                await self._catch_up(run_id, snapshot=False)
        while self._run_updates:
            _, run = self._run_updates.popitem()
            await self._send(encode_json(RunUpdate(run=run)))
        while self._events and not self._overflowed:
            event = self._events.popleft()
            self._queued_bytes -= len(event.frame)
            last = self._last_sent.get(event.run_id)
            if last is None or event.seq <= last:
                continue  # unsubscribed, or already sent by a catch-up
            if event.prev_seq != last or not event.frame:
                await self._catch_up(event.run_id, snapshot=False)
                continue
            await self._send(event.frame)
            self._last_sent[event.run_id] = event.seq

    async def _catch_up(self, run_id: str, *, snapshot: bool) -> None:
        after = self._last_sent.get(run_id)
        if after is None:
            return
        last_seq, columns = await self._read_metrics(run_id, after)
        if run_id not in self._last_sent or (last_seq <= after and not snapshot):
            return
        # In parts: one frame of everything since `after` held the loop for seconds
        # on a run of millions of points (see catchup). Each awaited send lets the
        # others be served between parts.
        for seq, series in parts(columns, max(last_seq, after)):
            await self._send(encode_json(Points(run=run_id, seq=seq, series=spelled(series))))
            if run_id not in self._following:
                # Unsubscribed meanwhile: command() takes it out of _following at
                # once; _last_sent only when pump() reaches the Unsubscribe.
                return
            self._last_sent[run_id] = seq


async def _write(ws: WebSocket, feed: DashboardFeed) -> None:
    """The feed's sender. If it fails (the store unreadable in a catch-up), the socket
    is closed with the reason: left open, the page would show itself live while
    nothing came. The page reconnects and resumes after the last seq it has."""
    try:
        await feed.run()
    except WebSocketDisconnect:
        return
    except StorageError as exc:
        refusal = ProtocolError(f"server storage error: {exc}", code=1011)
        logger.error("closing dashboard connection: %s", refusal.reason)
    except Exception as exc:
        if isinstance(exc, RuntimeError | OSError) and _closed(ws):
            return  # a send on a socket that went, or that is being closed
        # Anything else is a bug here: said, and the socket closed rather than left
        # open with nothing more to come.
        logger.exception("closing dashboard connection after an error")
        refusal = ProtocolError("server error", code=1011)
    else:
        return
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # closed meanwhile
        await ws.close(code=refusal.code, reason=refusal.reason)


def _closed(ws: WebSocket) -> bool:
    """Whether either end has closed the socket (a send then raises RuntimeError)."""
    disconnected = WebSocketState.DISCONNECTED
    return ws.application_state is disconnected or ws.client_state is disconnected


async def serve_dashboard(
    ws: WebSocket,
    store: Store,
    bus: Bus,
    version: str,
    max_queued: int,
    followers: Followers | None = None,
) -> None:
    """Run one browser connection until it closes."""
    await ws.accept()

    async def send(frame: bytes) -> None:
        await ws.send_text(frame.decode())

    async def read_metrics(run_id: str, after: int) -> tuple[int, dict[str, CommittedColumns]]:
        return await run_in_threadpool(store.columns_after, run_id, after)

    feed = DashboardFeed(read_metrics, send, max_queued, followers)
    # Subscribe before listing runs, so no run created in between is missed.
    unsubscribe = bus.subscribe(feed.on_event)
    writer: asyncio.Task[None] | None = None
    try:
        await send(encode_json(DashboardHello(v=PROTOCOL_VERSION, version=version)))
        # Runs(runs=...) as encode_json spells it, from the JSON the store made.
        runs = await run_in_threadpool(store.runs_json)
        await send(b'{"type":"runs","runs":' + runs + b"}")
        writer = asyncio.create_task(_write(ws, feed))
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await send(encode_json(DashboardError("dashboard frames must be JSON text")))
                continue
            try:
                feed.command(decode_dashboard_message(text))
            except ProtocolError as exc:
                await send(encode_json(DashboardError(str(exc))))
    except WebSocketDisconnect:
        return
    except RuntimeError:
        if _closed(ws):
            return  # closed by its writer (_write) while this answered a message
        raise
    finally:
        unsubscribe()
        feed.close()
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await writer
