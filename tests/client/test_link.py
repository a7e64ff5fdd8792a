"""The sender's connection (``trainwire.client.link``) against real sockets.

The servers here are websockets' own sans-I/O server protocol on a socket, run by
hand, so that each test can make the server do what a real one rarely does on cue:
fragment a message, ping, close with a code, or go silent.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from tests.conftest import MS
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from trainwire.client import link as link_module
from trainwire.client.link import Link, LinkTimeout

Script = Callable[[socket.socket, ServerProtocol], None]


def _send(conn: socket.socket, protocol: ServerProtocol) -> None:
    for data in protocol.data_to_send():
        if data:
            conn.sendall(data)


def _events(conn: socket.socket, protocol: ServerProtocol) -> list[object]:
    """The events of the next bytes the client sends (blocking)."""
    data = conn.recv(1 << 16)
    if data:
        protocol.receive_data(data)
    else:
        protocol.receive_eof()
    _send(conn, protocol)
    return protocol.events_received()


@contextmanager
def server(
    script: Script,
    *,
    status: int | None = None,
    receive_buffer: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[str]:
    """A one-connection WebSocket server on port 0 that accepts (or answers
    ``status``), then runs ``script``; yields its ws:// URL (wss:// with ``tls``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    if receive_buffer is not None:  # inherited by the connection it accepts
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5000 * MS)
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        with conn:
            try:
                protocol = ServerProtocol(max_size=None)
                request = None
                while request is None:
                    request = next(
                        (e for e in _events(conn, protocol) if isinstance(e, Request)), None
                    )
                response = protocol.accept(request)
                if status is not None:
                    response = protocol.reject(status, "refused\n")
                protocol.send_response(response)
                _send(conn, protocol)
                if status is None:
                    script(conn, protocol)
            except BaseException as exc:  # reported by the test, not lost in this thread
                errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        scheme = "ws" if tls is None else "wss"
        yield f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/ws/ingest"
        thread.join(5000 * MS)
        assert not errors, errors
    finally:
        listener.close()


def open_link(
    url: str,
    *,
    ping_interval: float = 10.0,
    ping_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Link:
    return Link.open(
        url,
        {"Authorization": "Bearer t"},
        ssl_context=ssl_context,
        open_timeout=5000 * MS,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=1000 * MS,
        logger=logging.getLogger("test.link"),
    )


def test_messages_go_both_ways_and_fragments_arrive_as_one_message() -> None:
    got: list[bytes] = []

    def echo_in_fragments(conn: socket.socket, protocol: ServerProtocol) -> None:
        while not got:
            for event in _events(conn, protocol):
                if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    got.append(bytes(event.data))
        protocol.send_binary(got[0][:3], fin=False)
        protocol.send_continuation(got[0][3:], fin=True)
        _send(conn, protocol)
        _events(conn, protocol)  # the client's close

    with server(echo_in_fragments) as url:
        link = open_link(url)
        link.send(b"hello, server")
        assert link.receive(5000 * MS) == [b"hello, server"]
        assert link.receive(0.0) == []  # nothing more, and no wait for it
        link.close()
    assert got == [b"hello, server"]


def test_the_server_s_ping_is_answered_while_reading() -> None:
    pongs: list[bytes] = []

    def ping(conn: socket.socket, protocol: ServerProtocol) -> None:
        protocol.send_ping(b"are you there")
        protocol.send_binary(b"after the ping")
        _send(conn, protocol)
        while not pongs:
            pongs.extend(
                bytes(e.data)
                for e in _events(conn, protocol)
                if isinstance(e, Frame) and e.opcode is Opcode.PONG
            )

    with server(ping) as url:
        link = open_link(url)
        assert link.receive(5000 * MS) == [b"after the ping"]
        link.close()
    assert pongs == [b"are you there"]


def test_a_close_frame_surfaces_with_the_server_s_code_and_reason() -> None:
    def refuse(conn: socket.socket, protocol: ServerProtocol) -> None:
        protocol.send_close(4401, "bad token")
        _send(conn, protocol)
        _events(conn, protocol)  # the client's answering close frame

    with server(refuse) as url:
        link = open_link(url)
        with pytest.raises(ConnectionClosedError) as closed:
            link.receive(5000 * MS)
        link.close()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "bad token")


def test_a_send_after_the_server_closed_and_left_raises_its_close_not_a_broken_pipe() -> None:
    """uvicorn stopping (`trainwire stop`) sends 1012 and closes the socket. The
    sender, asleep between flushes, learns of it from its next send: the close frame
    in the receive buffer says why, where the send alone says "Broken pipe"."""
    gone = threading.Event()

    def restart(conn: socket.socket, protocol: ServerProtocol) -> None:
        protocol.send_close(1012)
        _send(conn, protocol)
        conn.close()
        gone.set()

    with server(restart) as url:
        link = open_link(url)
        assert gone.wait(5000 * MS)
        with pytest.raises(ConnectionClosedError) as raised:
            # The first send may still be taken by the kernel; the peer's reset
            # then fails the next.
            for _ in range(100):
                link.send(b"a batch")
        assert raised.value.rcvd is not None and raised.value.rcvd.code == 1012
        link.close()


def test_a_refused_upgrade_raises_invalid_status() -> None:
    with server(lambda conn, protocol: None, status=403) as url:
        with pytest.raises(InvalidStatus) as refused:
            open_link(url)
    assert refused.value.response.status_code == 403


@pytest.mark.usefixtures("frozen_heap")  # a full collection would land in the timings
def test_a_server_that_stops_answering_is_found_dead_by_keepalive() -> None:
    silent = threading.Event()

    def go_silent(conn: socket.socket, protocol: ServerProtocol) -> None:
        silent.wait(5000 * MS)  # reads nothing, so answers no ping

    with server(go_silent) as url:
        link = open_link(url, ping_interval=50 * MS, ping_timeout=100 * MS)
        opened = time.monotonic()
        with pytest.raises(LinkTimeout):
            while True:  # the sender's loop: keepalive at each deadline it names
                link.keepalive()
                time.sleep(max(0.0, link.next_deadline() - time.monotonic()))
        took = time.monotonic() - opened
        link.close()  # at once: no closing handshake with a dead server
        closed_in = time.monotonic() - opened - took
        silent.set()
    assert 100 * MS <= took < 1000 * MS  # a ping due after 50 ms, then 100 ms unanswered
    assert closed_in < 100 * MS


def test_over_tls_a_pong_behind_other_frames_is_read_and_the_link_kept() -> None:
    """A TLS recv gives one record, one server frame: read once, a pong queued behind
    acks was left in the socket, and a trainer over wss logging a few rows a second
    dropped its link as dead every few seconds ("no pong within 3 s")."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    ponged = threading.Event()

    def acks_then_pong(conn: socket.socket, protocol: ServerProtocol) -> None:
        for n in range(3):  # the acks of three batches, one record each
            protocol.send_binary(b"ack %d" % n)
            _send(conn, protocol)
        while not ponged.is_set():  # websockets answers the ping itself, behind them
            if any(
                isinstance(e, Frame) and e.opcode is Opcode.PING for e in _events(conn, protocol)
            ):
                ponged.set()
        _events(conn, protocol)  # the client's close

    with server(acks_then_pong, tls=server_context) as url:
        link = open_link(
            url, ping_interval=10 * MS, ping_timeout=50 * MS, ssl_context=client_context
        )
        while link.next_deadline() - time.monotonic() > 0:  # the ping falls due
            time.sleep(link.next_deadline() - time.monotonic())
        link.keepalive()  # sends it
        assert ponged.wait(5000 * MS)
        time.sleep(max(0.0, link.next_deadline() - time.monotonic()))  # its answer is due
        link.keepalive()  # reads what is there: the pong too, so no LinkTimeout
        assert link.receive(0.0) == [b"ack 0", b"ack 1", b"ack 2"]
        link.close()


def test_a_live_server_keeps_the_link_alive_through_many_pings() -> None:
    stop = threading.Event()
    pings = 0

    def answer(conn: socket.socket, protocol: ServerProtocol) -> None:
        nonlocal pings
        while not stop.is_set():
            events = _events(conn, protocol)  # websockets answers each ping itself
            pings += sum(isinstance(e, Frame) and e.opcode is Opcode.PING for e in events)
            if protocol.close_rcvd is not None:
                return

    with server(answer) as url:
        link = open_link(url, ping_interval=20 * MS, ping_timeout=200 * MS)
        until = time.monotonic() + 300 * MS
        while time.monotonic() < until:
            link.keepalive()
            link.receive(5 * MS)
        stop.set()
        link.close()
    assert pings >= 5


def test_a_name_lookup_gives_up_at_the_deadline_and_is_not_started_twice(
    hung_resolver: list[str],
) -> None:
    """getaddrinfo has no timeout: the lookup runs on a thread of its own, abandoned
    at the connection's deadline; a retry while it still hangs waits for the same one."""
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            link_module._connect("server.hung.invalid", 9, started + 100 * MS)
        assert time.monotonic() - started < 1000 * MS
    assert hung_resolver == ["server.hung.invalid"]


def test_a_name_is_still_looked_up_when_no_thread_can_be_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.12+ refuses new threads once the interpreter is finalizing, atexit
    handlers included: the finish of a run left open reconnects there. The lookup
    thread's RuntimeError failed every attempt until the timeout, each logged with a
    traceback, and nothing was delivered."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    addresses = link_module._addresses("localhost", 9, time.monotonic() + 1.0)
    assert addresses and all(address[4][1] == 9 for address in addresses)


def test_a_big_message_on_a_slow_but_working_link_is_sent_whole() -> None:
    """sendall's timeout bounds the whole send: 16 MiB to a reader taking about 5 MB/s
    was given up as a dead link after the ping timeout, and again at every reconnect.
    (A blocked send alone wakes only once half the kernel's buffer has drained, which
    takes longer than the ping timeout here too: the send queue's progress counts.)"""
    size = 16 << 20
    got: list[int] = []

    def read_slowly(conn: socket.socket, protocol: ServerProtocol) -> None:
        conn.settimeout(10_000 * MS)
        while not got:
            time.sleep(50 * MS)  # a reader slower than the link: 256 KiB a turn
            protocol.receive_data(conn.recv(256 << 10))
            for event in protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    got.append(len(event.data))
        _events(conn, protocol)  # the client's close

    with server(read_slowly, receive_buffer=256 << 10) as url:
        link = open_link(url, ping_timeout=100 * MS)
        started = time.monotonic()
        link.send(bytes(size))
        took = time.monotonic() - started
        link.close()
    assert got == [size]
    assert took > 1000 * MS  # ten times the ping timeout, as the test means


def test_a_child_forked_during_a_name_lookup_starts_its_own(hung_resolver: list[str]) -> None:
    """The parent's lookup has no thread in a forked child (a DataLoader worker, a
    multiprocessing child that starts its own run): waited for there, it never ends,
    and a lock held at the fork never opens."""
    import os

    with pytest.raises(TimeoutError):  # the parent gives up; its lookup goes on
        link_module._connect("server.hung.invalid", 9, time.monotonic() + 50 * MS)
    assert link_module._lookups
    with link_module._lookups_lock:  # held at the fork
        pid = os.fork()
        if pid == 0:  # the child: no lookup of the parent's, a lock it can take
            clean = not link_module._lookups
            os._exit(0 if clean and link_module._lookups_lock.acquire(timeout=1) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
