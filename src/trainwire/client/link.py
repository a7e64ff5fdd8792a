"""The sender's WebSocket connection: websockets' sans-I/O protocol on a plain socket,
driven by the sender thread alone.

Why not ``websockets.sync.client``: it runs a thread of its own that wakes for every
frame the server sends (an ack per batch, and pings), and a keepalive thread beside
it. Each wake-up holds the GIL the training loop wants, for about 0.2 ms on a VM:
about a third of the CPU that logging every step cost a fast loop. Here nothing runs
between the sender's own wake-ups: acks wait in the kernel's socket buffer until the
sender reads them, and the keepalive pings are timed by the sender's waits
(:meth:`Link.next_deadline`).

Decisions:
- Connects directly, ignoring ``HTTP(S)_PROXY``: a trainwire server sits on the
  training network, where a proxy meant for the internet would only be in the way.
- A link found dead (no pong in time, a send that cannot progress) is dropped at once,
  without a closing handshake that a dead link cannot complete. A send is dead when
  the peer takes nothing for the ping timeout, however long the whole send takes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import socket
import ssl
import sys
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import USER_AGENT
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["Link", "LinkTimeout"]

_READ_SIZE: Final = 1 << 16
# The most TLS records one read takes (see Link._read_more_records): a bound on the
# time it holds the sender, should the server send without pause.
_MAX_RECORDS: Final = 256
# A blocked send wakes this often to see whether the peer took anything (_send_all).
SEND_SLICE: Final = 0.25


def _unsent(sock: socket.socket) -> int | None:
    """Bytes in the kernel's send queue not yet acknowledged by the peer (Linux's
    SIOCOUTQ); None where the system does not say."""
    try:
        buffer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int.from_bytes(buffer, sys.byteorder, signed=True)


class LinkTimeout(TimeoutError):
    """The server did not answer in time: the link is dead, or as good as."""


class Link:
    """One open WebSocket connection to the server. Not thread-safe: one thread
    (the sender) calls every method.

    Args:
        sock: connected, TLS already on for ``wss``; its timeout bounds every send.
        protocol: websockets' state machine, its opening handshake done.
        ping_interval: a ping goes out this long after the last pong.
        ping_timeout: a pong later than this after its ping means a dead link.
        close_timeout: the longest :meth:`close` waits for the server's close frame.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol: ClientProtocol,
        *,
        ping_interval: float,
        ping_timeout: float,
        close_timeout: float,
    ) -> None:
        self._sock = sock
        self._protocol = protocol
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self._messages: list[bytes | str] = []
        self._fragments: list[Frame] = []
        self._ping_sent_at: float | None = None  # awaiting its pong since then
        self._next_ping = time.monotonic() + ping_interval
        self._dead = False

    @classmethod
    def open(
        cls,
        url: str,
        headers: Mapping[str, str],
        *,
        ssl_context: ssl.SSLContext | None,
        open_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        close_timeout: float,
        logger: logging.Logger | logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> Link:
        """Connect and complete the opening handshake within ``open_timeout`` seconds.

        Raises:
            websockets.exceptions.InvalidStatus: the server refused the upgrade (a 403).
            OSError, TimeoutError: the server cannot be reached, or does not answer.
        """
        deadline = time.monotonic() + open_timeout
        uri = parse_uri(url)
        sock = _connect(uri.host, uri.port, deadline)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if uri.secure:
                context = ssl_context or ssl.create_default_context()
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock = context.wrap_socket(sock, server_hostname=uri.host)
            # Sends that make no progress for PING_TIMEOUT mean a dead link too.
            sock.settimeout(ping_timeout)
            protocol = ClientProtocol(uri, max_size=None, logger=logger)
            request = protocol.connect()
            request.headers.update(headers)
            request.headers.setdefault("User-Agent", USER_AGENT)
            protocol.send_request(request)
            link = cls(
                sock,
                protocol,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=close_timeout,
            )
            link._flush()
            link._handshake(deadline)
            return link
        except BaseException:
            sock.close()
            raise

    def _handshake(self, deadline: float) -> None:
        # _read hands the response to the protocol, which opens or records why not.
        while self._protocol.state is State.CONNECTING:
            if self._protocol.handshake_exc is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout("timed out waiting for the server's handshake response")
            try:
                self._read(left)
            except ConnectionClosedError:
                if self._protocol.state is State.CONNECTING or self._protocol.handshake_exc:
                    raise
                # Opened, then closed at once (a refusal after the upgrade): the
                # sender's first receive() or send() reports it, with its code.
        if self._protocol.handshake_exc is not None:
            raise self._protocol.handshake_exc

    # -- the sender's calls -------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Send one binary message.

        Raises:
            ConnectionClosedError: the server closed the connection (its code says why).
            TimeoutError: the send made no progress for ``ping_timeout``: a dead link.
        """
        try:
            self._protocol.send_binary(message)
        except InvalidState:  # closed already: by the server, its close frame says why
            raise (self._server_close() or self._closed()) from None
        self._flush_or_closed()

    def receive(self, timeout: float) -> list[bytes | str]:
        """Messages that arrive within ``timeout`` seconds (0: those already here), as
        bytes (text messages as str); answers the server's pings and takes the pongs
        to ours on the way.

        Raises:
            ConnectionClosedError: the server closed the connection.
        """
        if self._protocol.close_rcvd is not None:
            raise self._closed()
        deadline = time.monotonic() + timeout
        while not self._messages:
            left = deadline - time.monotonic()
            if not self._read(max(left, 0.0)) or left <= 0:
                break
        messages, self._messages = self._messages, []
        return messages

    def keepalive(self) -> None:
        """Send the ping that is due; a pong overdue means the link is dead.

        Call at each wake-up; :meth:`next_deadline` says when the next is due.

        Raises:
            LinkTimeout: no pong within ``ping_timeout`` of its ping.
        """
        now = time.monotonic()
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at < self.ping_timeout:
                return
            self._read(0.0)  # the pong may be in the socket's buffer, unread
            if self._ping_sent_at is not None:
                self._dead = True
                raise LinkTimeout(f"no pong within {self.ping_timeout:g} s: the link is dead")
        elif now >= self._next_ping:
            self._ping_sent_at = now
            self._protocol.send_ping(b"")
            self._flush_or_closed()

    def next_deadline(self) -> float:
        """When :meth:`keepalive` next has something to do (a ``time.monotonic``)."""
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.ping_timeout
        return self._next_ping

    def close(self) -> None:
        """Close: the closing handshake if the link is alive (within ``close_timeout``),
        then the socket. Never raises."""
        try:
            if not self._dead and self._protocol.state is State.OPEN:
                self._protocol.send_close()
                self._flush()
                deadline = time.monotonic() + self.close_timeout
                while (left := deadline - time.monotonic()) > 0 and self._read(left):
                    pass  # until the server's close frame, which _read raises as closed
        except (OSError, ConnectionClosedError):
            pass  # closing anyway
        finally:
            self._selector.close()
            self._sock.close()

    # -- I/O ------------------------------------------------------------------------

    def _read(self, timeout: float) -> bool:
        """Feed what arrives within ``timeout`` to the protocol and act on its events.

        Returns:
            False if nothing arrived within ``timeout``.

        Raises:
            ConnectionClosedError: the connection is closed (a close frame or EOF).
        """
        if not self._buffered() and not self._selector.select(timeout):
            return False
        # Never block in recv: with TLS, what made the socket readable may be part of
        # a record, or a record with no data for us (a TLS 1.3 session ticket).
        self._sock.settimeout(0.0)
        try:
            data = self._sock.recv(_READ_SIZE)
            if data:
                self._protocol.receive_data(data)
                self._read_more_records()
        except ssl.SSLWantReadError:
            return True  # TLS took bytes and has nothing to give yet: wait again
        except BlockingIOError:
            return False
        finally:
            self._sock.settimeout(self.ping_timeout)  # sends: see open()
        if not data:
            self._protocol.receive_eof()
        for event in self._protocol.events_received():
            self._take(event)
        try:
            self._flush()  # pongs to the server's pings, the reply to its close frame
        except OSError:
            if self._protocol.close_rcvd is None:
                raise
            # The server closed and is gone: no reply can reach it, and its close
            # frame, not the broken pipe, says why.
        if self._protocol.close_rcvd is not None or self._protocol.state is State.CLOSED:
            raise self._closed()
        return True

    def _read_more_records(self) -> None:
        """With TLS, the records already here after the first: a recv gives one, and
        uvicorn writes one per frame. Read once, the acks a trainer reads every
        ACK_READ_INTERVAL fell ever further behind, and a pong queued after them was
        taken for a dead link. The socket is non-blocking (see _read)."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return  # one recv of _READ_SIZE took what the kernel held
        for _ in range(_MAX_RECORDS):
            try:
                data = self._sock.recv(_READ_SIZE)
            except OSError:
                # Nothing more yet (SSLWantReadError), or a failure the next read or
                # send meets: what was read stands, a close frame among it included.
                return
            if not data:
                self._protocol.receive_eof()
                return
            self._protocol.receive_data(data)

    def _buffered(self) -> bool:
        # Decrypted bytes the kernel no longer shows as readable.
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    def _take(self, event: object) -> None:
        if not isinstance(event, Frame):
            return  # the handshake's response: the protocol's state tells
        if event.opcode is Opcode.PONG:
            if self._ping_sent_at is not None:
                self._ping_sent_at = None
                self._next_ping = time.monotonic() + self.ping_interval
        elif event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
            self._fragments.append(event)
            if event.fin:  # a whole message: its first frame's opcode says its kind
                first, data = self._fragments[0], b"".join(f.data for f in self._fragments)
                self._fragments = []
                self._messages.append(data.decode() if first.opcode is Opcode.TEXT else data)

    def _flush_or_closed(self) -> None:
        """:meth:`_flush`, where a send that fails because the server closed first (a
        restart, ``trainwire stop``: uvicorn sends 1012, then closes the socket) raises
        that close, read from the receive buffer, rather than the broken pipe it caused.

        Raises:
            ConnectionClosedError: the server closed the connection, with its code.
            OSError: the send failed, and no close frame from the server explains it.
        """
        try:
            self._flush()
        except OSError:
            closed = self._server_close()
            if closed is not None:
                raise closed from None
            raise

    def _server_close(self) -> ConnectionClosedError | None:
        """The server's close, if its close frame was read, or is waiting in the
        receive buffer (read now); None if it sent none. A reset that followed the
        frame (the server gone since) does not hide it."""
        if self._protocol.close_rcvd is None:
            with contextlib.suppress(OSError, ConnectionClosedError):
                self._read(0.0)
        return self._closed() if self._protocol.close_rcvd is not None else None

    def _flush(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._send_all(data)
            else:  # websockets' "half-close now"
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _send_all(self, data: bytes) -> None:
        """Send ``data``; a dead link is one that takes nothing for ``ping_timeout``.

        Not ``sendall``: its timeout bounds the whole send, so a big frame on a slow
        but working link (4 MiB at 1 MB/s) was taken for a dead one at every attempt.
        Nor ``send`` alone: the kernel wakes a blocked sender only once half its
        buffer (megabytes) has drained, which a slow link takes seconds to do. Each
        wait is a slice of SEND_SLICE; between them, bytes leaving the kernel's send
        queue (the peer acknowledging them) count as progress too.
        """
        view = memoryview(data)
        stalled_since = time.monotonic()
        queued = _unsent(self._sock)
        self._sock.settimeout(min(SEND_SLICE, self.ping_timeout))
        try:
            while view:
                try:
                    sent = self._sock.send(view)
                except TimeoutError:
                    sent = 0
                now = time.monotonic()
                if sent:
                    view = view[sent:]
                    stalled_since, queued = now, _unsent(self._sock)
                    continue
                left = _unsent(self._sock)
                if left is not None and queued is not None and left < queued:
                    stalled_since = now  # the peer took some: slow, not dead
                queued = left
                if now - stalled_since >= self.ping_timeout:
                    self._dead = True
                    raise LinkTimeout("a send made no progress: the link is dead")
        finally:
            self._sock.settimeout(self.ping_timeout)

    def _closed(self) -> ConnectionClosedError:
        protocol = self._protocol
        return ConnectionClosedError(
            protocol.close_rcvd, protocol.close_sent, protocol.close_rcvd_then_sent
        )


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address of ``host`` that answers before
    ``deadline``. ``socket.create_connection`` gives each address the whole timeout:
    a name with several addresses (localhost: ::1 and 127.0.0.1) behind a firewall
    that drops packets would take that many times as long, past the time finish()
    waits for the sender to save what it holds."""
    error: OSError = TimeoutError(f"could not connect to {host}:{port} in time")
    for family, kind, proto, _, address in _addresses(host, port, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


_AddrInfo = Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]


class _Lookup:
    """One name lookup, on a daemon thread of its own: ``getaddrinfo`` takes no
    timeout, and a resolver that does not answer (an air-gapped cluster's DNS
    misconfigured) blocks it for 10-30 s. A sender blocked there would miss the time
    finish() gives it to save its rows to the run file, and they would be lost with
    the process. A lookup that outlives its caller's deadline is left to finish; the
    next connection attempt to the same name waits for it rather than start another."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.result: _AddrInfo | OSError = TimeoutError(f"looking up {host} timed out")
        threading.Thread(
            target=self._run, args=(host, port), name="trainwire-lookup", daemon=True
        ).start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.result = exc
        finally:
            with _lookups_lock:
                _lookups.pop((host, port), None)
            self.done.set()


_lookups: dict[tuple[str, int], _Lookup] = {}
_lookups_lock = threading.Lock()


def _forget_lookups() -> None:
    """In a forked child: the parent's lookups have no thread here, and would be waited
    for in vain; its lock may have been held at the fork."""
    global _lookups_lock
    _lookups.clear()
    _lookups_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_lookups)


def _addresses(host: str, port: int, deadline: float) -> _AddrInfo:
    """``host``'s addresses, or TimeoutError at ``deadline``."""
    try:  # an address, not a name (the common case: 127.0.0.1): nothing to look up
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    try:
        with _lookups_lock:
            lookup = _lookups.get((host, port))
            if lookup is None:
                lookup = _lookups[(host, port)] = _Lookup(host, port)
    except RuntimeError:
        # No new thread at interpreter shutdown (Python 3.12+, CPython gh-113964):
        # the finish of a run left open, at exit, reconnecting. Here, not a failure
        # at every attempt until finish()'s timeout, each with a traceback.
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    lookup.done.wait(max(0.0, deadline - time.monotonic()))
    result = lookup.result
    if isinstance(result, OSError):
        raise result
    return result
