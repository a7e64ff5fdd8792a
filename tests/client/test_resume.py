"""The resumed run's step read (trainwire.client.resume): its token goes to the
server alone, and no answer of another service makes init() raise."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from tests.conftest import TOKEN, LiveServer

import trainwire
from trainwire.client import run as run_module
from trainwire.client.resume import last_step
from trainwire.client.run import _resumed_step


@contextmanager
def raw_server(reply: Callable[[int], bytes]) -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server that answers each request with ``reply(port)``; yields its port
    and the requests it read (each taken before its reply is sent)."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                requests.append(conn.recv(65536))
                conn.sendall(reply(port))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, requests
    finally:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone does not)
        sock.close()
        thread.join(5)


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_a_redirect_is_not_followed_with_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """urllib forwards every header to a redirect's target, another host's, or plain
    http's from https: the token went wherever the server (or a proxy in front of
    it) pointed."""
    with raw_server(lambda port: NOT_FOUND) as (elsewhere, stolen):
        location = f"http://localhost:{elsewhere}/api/runs/r1"
        moved = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        with raw_server(lambda port: moved.encode()) as (server, asked):
            url = f"http://127.0.0.1:{server}"
            assert (
                _resumed_step(url, f"ws://127.0.0.1:{server}/ws/ingest", "SECRET", "r1", None) == -1
            )
    assert len(asked) == 1 and b"Bearer SECRET" in asked[0]
    assert stolen == []  # urlopen returns only after a redirect it follows
    assert "(302 Found)" in caplog.text


def test_the_token_does_not_go_through_an_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's WebSocket goes straight to the server; the step read went to
    $http_proxy, the token in clear text with it (and a loopback server, which no
    proxy reaches, was never asked)."""
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's, built from the env
    with raw_server(lambda port: NOT_FOUND) as (proxy, seen):
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        _resumed_step("http://127.0.0.1:9", "ws://127.0.0.1:9/ws/ingest", "SECRET", "r1", None)
    assert seen == []


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",  # another service on the port: no HTTP status line
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"summ',  # cut short
    ],
)
def test_an_answer_that_is_no_http_is_said_not_raised(
    reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """http.client's BadStatusLine and IncompleteRead are no OSError: they came out
    of init(), which raises only ConfigError and TransientError."""
    caplog.set_level(logging.WARNING, logger="trainwire.client")
    with raw_server(lambda port: reply) as (port, _):
        url = f"http://127.0.0.1:{port}"
        assert _resumed_step(url, f"ws://127.0.0.1:{port}/ws/ingest", None, "r1", None) == -1
    assert "could not read run r1's last step" in caplog.text


def test_a_server_named_by_its_websocket_url_is_asked_over_http(live_server: LiveServer) -> None:
    """init() takes ws:// and wss:// server URLs; urllib knows neither scheme."""
    with trainwire.init(url=live_server.url, id="ws-named") as run:
        run.log({"x": 0.0}, step=41)
    ws_url = "ws" + live_server.url.removeprefix("http")
    assert last_step(ws_url, TOKEN, "ws-named", rank=None, ssl_context=None) == 41


def test_a_name_lookup_that_never_answers_holds_init_no_longer_than_the_timeout(
    hung_resolver: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """getaddrinfo takes no timeout, and urlopen's bounds each socket call, not the
    request: a resumed init() waited the resolver's 10-30 s on the training thread
    (the WebSocket's lookup is the sender thread's)."""
    monkeypatch.setattr(run_module, "RESUME_TIMEOUT", 0.2)
    started = time.monotonic()
    run = trainwire.init(url="https://trainwire.hung.invalid:8765", resume="r1")
    assert time.monotonic() - started < 5  # the fixture's lookup answers after 30 s
    assert "trainwire.hung.invalid" in hung_resolver
    assert "could not read run r1's last step" in caplog.text
    assert "no answer within 0.2 s" in caplog.text
    run.finish(timeout=0)
