"""A TCP proxy that breaks connections on request: cut, stall and blackhole.

Written for the fault tests: it sits between a trainer (or a dashboard) and a real
trainwire server, both on loopback, and lets a test pull the cable in the ways a
network does. It runs its own asyncio loop on a daemon thread. Every control method
is called from the test's thread and returns only once the proxy has applied it, so
a fault is in place when the call returns: no test sleeps to "let it take effect".

Faults, and what each looks like from the two ends:

- :meth:`FaultProxy.cut`: every open connection is reset (RST), as when a NAT or a
  load balancer drops its state. Both ends see the connection die at once; new
  connections are accepted and forwarded as usual.
- :meth:`FaultProxy.stall`: no byte moves, either way, on any connection, but every
  socket stays open. The proxy stops reading, so a sender's TCP window fills and its
  writes block, as behind a congested link or a frozen peer. :meth:`unstall` lets the
  bytes flow again, none lost.
- :meth:`FaultProxy.blackhole`: every byte is read and silently thrown away, on open
  and new connections, and no close is passed on either: the ends only notice by
  their own timeouts (websocket pings), as behind a firewall that drops packets.
  :meth:`restore` makes *new* connections work again; a connection that lost bytes
  stays a black hole until an end gives up, since its stream can never be whole again
  (forwarding it after a hole would test garbage handling, not dead-peer detection).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

from tests.conftest import MS

__all__ = ["FaultProxy", "ProxyStats"]

_T = TypeVar("_T")

# How long a control call waits for the proxy's loop to apply it. The loop does
# nothing slow, so hitting this means the proxy itself is broken.
_CONTROL_TIMEOUT: Final = 10_000 * MS
_CHUNK: Final = 64 * 1024
# SO_LINGER on, with a zero timeout: close() sends RST instead of FIN.
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of what the proxy has done since it started.

    Attributes:
        accepted: connections accepted from clients.
        open: connections not yet closed on both sides.
        forwarded: bytes passed on, both directions together.
        dropped: bytes read and thrown away by a blackhole.
        cut: connections reset by :meth:`FaultProxy.cut`.
        closed_by_client: connections the client end closed or reset itself: how a
            test sees a client give up on a dead (blackholed) connection.
        stalled: no byte moves now.
        blackholed: new connections go into the blackhole now.
    """

    accepted: int = 0
    open: int = 0
    forwarded: int = 0
    dropped: int = 0
    cut: int = 0
    closed_by_client: int = 0
    stalled: bool = False
    blackholed: bool = False


class _Ended(enum.Enum):
    """Why one direction of a link stopped."""

    EOF = "eof"  # the source closed its side cleanly
    RESET = "reset"  # a socket error on either side


@dataclass(eq=False)
class _Side:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass(eq=False)
class _Link:
    """One client connection and, unless it was born in a blackhole, its upstream."""

    client: _Side
    upstream: _Side | None = None
    blackholed: bool = False
    cut: bool = False  # reset by cut(): whatever its pumps see next is our doing
    task: asyncio.Task[Any] | None = None
    pumps: list[asyncio.Task[_Ended]] = field(default_factory=list)


class FaultProxy:
    """Forwards TCP connections from ``127.0.0.1:port`` to ``target``, with faults.

    Args:
        target: the ``(host, port)`` to forward to; loopback only.
        buffer_bytes: the receive buffer of the proxy's sockets, and the most it reads
            ahead. Small and fixed (the kernel would otherwise autotune it to tens of
            MB), so that a stall fills a sender's window soon and predictably.

    Raises:
        ValueError: ``target`` is not a loopback address.

    Use it as a context manager, or call :meth:`close`. ``port`` and ``url`` are set
    once the constructor returns.
    """

    def __init__(self, target: tuple[str, int], *, buffer_bytes: int = 64 * 1024) -> None:
        host, port = target
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the fault proxy only forwards to loopback, not {host!r}")
        self.target = (host, port)
        self._buffer_bytes = buffer_bytes
        self._links: set[_Link] = set()
        self._blackholed = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._blackhole_timer: asyncio.TimerHandle | None = None
        # Written by the loop, read and waited on by the test's thread: under a
        # threading condition, notified at every change.
        self._stats = ProxyStats()
        self._stats_changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        self._server: asyncio.Server = self._call(self._listen())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    # -- controls (called from the test's thread) -------------------------------------

    def cut(self) -> int:
        """Reset every open connection now; keep accepting new ones.

        Returns:
            how many connections were reset.
        """
        return self._call(self._cut_all())

    def stall(self, seconds: float | None = None) -> None:
        """Stop moving bytes, both ways, on every connection; keep the sockets open.

        Args:
            seconds: unstall by itself after this long; None: until :meth:`unstall`.
        """
        self._call(self._set_stalled(True, seconds))

    def unstall(self) -> None:
        """Let bytes flow again, from where they stopped."""
        self._call(self._set_stalled(False, None))

    def blackhole(self, seconds: float | None = None) -> None:
        """Read and drop every byte, on open and new connections, and pass no close on.

        Args:
            seconds: :meth:`restore` by itself after this long; None: until called.
        """
        self._call(self._set_blackholed(True, seconds))

    def restore(self) -> None:
        """Forward new connections again (those that lost bytes stay black holes)."""
        self._call(self._set_blackholed(False, None))

    @property
    def stalled(self) -> bool:
        return self.stats().stalled

    @property
    def blackholed(self) -> bool:
        return self.stats().blackholed

    def stats(self) -> ProxyStats:
        """What the proxy has done so far."""
        with self._stats_changed:
            return self._stats

    def wait_for(self, condition: Callable[[ProxyStats], bool], timeout: float) -> bool:
        """Wait until ``condition(stats)`` holds; the proxy notifies every change.

        Returns:
            False if ``timeout`` seconds passed first.
        """
        with self._stats_changed:
            return self._stats_changed.wait_for(lambda: condition(self._stats), timeout)

    def wait_accepted(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` connections have been accepted in all."""
        return self.wait_for(lambda stats: stats.accepted >= count, timeout)

    def close(self) -> None:
        """Stop listening, reset every connection, and stop the proxy's thread.

        Idempotent.
        """
        if self._loop.is_closed():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CONTROL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT)

    # -- the loop's side ----------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        # Made here, on the loop that will wait on it.
        self._flowing = asyncio.Event()
        self._flowing.set()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Accepted sockets inherit the listener's receive buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._buffer_bytes)
        sock.bind(("127.0.0.1", 0))
        return await asyncio.start_server(self._accept, sock=sock, limit=self._buffer_bytes)

    async def _open_upstream(self) -> _Side:
        sock = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._buffer_bytes)
            sock.setblocking(False)
            await self._loop.sock_connect(sock, self.target)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=self._buffer_bytes)
        return _Side(reader, writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(client=_Side(reader, writer), blackholed=self._blackholed)
        # The link runs in a task of its own, not in this callback's: cut() cancels it,
        # and asyncio (3.11) reports a cancelled callback task as an unhandled error.
        link.task = asyncio.create_task(self._serve(link))
        self._links.add(link)
        self._count(accepted=1, open=1)

    async def _serve(self, link: _Link) -> None:
        clean = False
        try:
            if not link.blackholed:
                try:
                    link.upstream = await self._open_upstream()
                except OSError:
                    # Nothing listens upstream: the client sees its connection die at
                    # once, as it would have seen a refused connect without the proxy.
                    return
            up = link.upstream
            link.pumps.append(asyncio.create_task(self._pump(link, link.client, up)))
            if up is not None:
                link.pumps.append(asyncio.create_task(self._pump(link, up, link.client)))
            pending = set(link.pumps)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not link.blackholed and any(t.result() is _Ended.RESET for t in done):
                    return  # an error on one side: reset the other too, like a real path
            clean = True
        finally:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            self._close_link(link, reset=not clean)

    async def _pump(self, link: _Link, src: _Side, dst: _Side | None) -> _Ended:
        """Copy ``src`` to ``dst`` until EOF or an error; drop instead while blackholed."""
        while True:
            # A stalled proxy does not even read: the sender's window fills.
            await self._flowing.wait()
            try:
                data = await src.reader.read(_CHUNK)
            except OSError:  # reset by the peer at this side
                return self._source_ended(link, src, dst, _Ended.RESET)
            if not data:
                return self._source_ended(link, src, dst, _Ended.EOF)
            # stall() or blackhole() may have come while this read waited.
            await self._flowing.wait()
            if link.blackholed or dst is None:
                self._count(dropped=len(data))
                continue
            try:
                dst.writer.write(data)
                await dst.writer.drain()
            except OSError:  # the other side is gone: its own pump reports it
                return _Ended.RESET
            self._count(forwarded=len(data))

    def _source_ended(self, link: _Link, src: _Side, dst: _Side | None, how: _Ended) -> _Ended:
        if src is link.client and not link.cut:
            self._count(closed_by_client=1)
        if link.blackholed or dst is None:
            # That peer gave up; the other end must not hear of it: only this side ends.
            if how is _Ended.RESET:
                src.writer.transport.abort()
            else:
                src.writer.close()
        elif how is _Ended.EOF and dst.writer.can_write_eof() and not dst.writer.is_closing():
            with contextlib.suppress(OSError):
                dst.writer.write_eof()  # pass the half-close on, as TCP would
        return how

    def _close_link(self, link: _Link, *, reset: bool) -> None:
        if link in self._links:
            self._links.discard(link)
            self._count(open=-1)
        for side in (link.client, link.upstream):
            if side is None:
                continue
            transport = side.writer.transport
            if transport.is_closing():
                continue
            if reset:
                sock = side.writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                transport.abort()
            else:
                transport.close()

    async def _cut_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.cut = True
            self._close_link(link, reset=True)
            if link.task is not None:
                link.task.cancel()
        await asyncio.gather(*(link.task for link in links if link.task), return_exceptions=True)
        self._count(cut=len(links))
        return len(links)

    async def _set_stalled(self, stalled: bool, seconds: float | None) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if stalled:
            self._flowing.clear()
            self._update(stalled=True)
            if seconds is not None:
                self._stall_timer = self._loop.call_later(seconds, self._end_stall)
        else:
            self._end_stall()

    def _end_stall(self) -> None:
        self._stall_timer = None
        self._flowing.set()
        self._update(stalled=False)

    async def _set_blackholed(self, blackholed: bool, seconds: float | None) -> None:
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        self._blackholed = blackholed
        self._update(blackholed=blackholed)
        if blackholed:
            for link in self._links:
                link.blackholed = True
            if seconds is not None:
                self._blackhole_timer = self._loop.call_later(seconds, self._end_blackhole)

    def _end_blackhole(self) -> None:
        self._blackhole_timer = None
        self._blackholed = False
        self._update(blackholed=False)

    def _count(self, **changes: int) -> None:
        with self._stats_changed:
            current = self._stats
            self._update(**{name: getattr(current, name) + n for name, n in changes.items()})

    def _update(self, **fields: Any) -> None:
        with self._stats_changed:  # reentrant: _count holds it already
            self._stats = dataclasses.replace(self._stats, **fields)
            self._stats_changed.notify_all()

    async def _shutdown(self) -> None:
        self._server.close()
        await self._cut_all()
        await self._server.wait_closed()
        for timer in (self._stall_timer, self._blackhole_timer):
            if timer is not None:
                timer.cancel()
        self._flowing.set()
        self._update(stalled=False, blackholed=False)
