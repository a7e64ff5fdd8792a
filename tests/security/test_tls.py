"""TLS over real sockets: a server with a certificate from a test CA (trustme), the
client trusting it through ``TRAINWIRE_CA`` or refusing it, and wss dashboards.

No traffic leaves loopback: the refusal of plain http to another machine is checked
before any connection, and its acceptance only through the pure ``_ingest_url``.
"""

from __future__ import annotations

import email.message
import http.client
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect
from websockets.typing import Origin

import trainwire
from tests.conftest import MS, TOKEN
from trainwire.client.run import _ingest_url
from trainwire.server.app import create_app
from trainwire.server.runner import bind, server_url, uvicorn_config
from trainwire.settings import Settings

trustme = pytest.importorskip("trustme")


@dataclass
class Certificates:
    ca: Path  # the CA bundle a client must trust
    cert: Path  # the server's certificate chain, for 127.0.0.1 and localhost
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = Certificates(ca=where / "ca.pem", cert=where / "cert.pem", key=where / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(paths.key))
    return paths


@dataclass
class TLSServer:
    url: str  # https://127.0.0.1:PORT
    port: int
    trusting: ssl.SSLContext  # a client context that trusts the test CA

    @property
    def wss_url(self) -> str:
        return self.url.replace("https://", "wss://")

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        """A plain HTTPS request, verified against the test CA."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.trusting, timeout=10_000 * MS
        )
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()

    def get_json(self, path: str) -> Any:
        reply = self.get(path, {"Authorization": f"Bearer {TOKEN}"})
        assert reply.status == 200, reply.body
        return json.loads(reply.body)


@dataclass
class Reply:
    status: int
    headers: email.message.Message
    body: bytes


@pytest.fixture
def tls_server(tmp_path: Path, certificates: Certificates) -> Iterator[TLSServer]:
    """A real server (uvicorn in a thread, as tests/conftest.py's LiveServer) on https."""
    settings = Settings(
        port=0,
        data_dir=tmp_path / "server-data",
        token=TOKEN,
        certfile=certificates.cert,
        keyfile=certificates.key,
    )
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    # Ready once a handshake completes: uvicorn only serves after its startup.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10_000 * MS) as raw,
        trusting.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass
    try:
        yield TLSServer(server_url(sock, tls=True), port, trusting)
    finally:
        server.should_exit = True
        thread.join(10_000 * MS)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


class _Waiter(logging.Handler):
    """Sets an event when a record's message contains ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage().lower():
            self.seen.set()


@pytest.fixture
def no_ambient_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("TRAINWIRE_CA", "SSL_CERT_FILE", "SSL_CERT_DIR", "TRAINWIRE_INSECURE"):
        monkeypatch.delenv(variable, raising=False)


def test_a_run_over_https_is_stored_when_trainwire_ca_trusts_the_server(
    tls_server: TLSServer, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINWIRE_CA", str(certificates.ca))
    run = trainwire.init(project="tls", name="over-https", url=tls_server.url)
    assert run.url is not None and run.url.startswith(f"{tls_server.url}/?run=")
    for step in range(20):
        run.log({"loss": 1.0 / (step + 1)})
    run.finish(timeout=10_000 * MS)
    assert run.delivered
    metrics = tls_server.get_json(f"/api/runs/{run.id}/metrics")["series"]
    assert metrics["loss"]["step"] == list(range(20))
    assert tls_server.get_json(f"/api/runs/{run.id}")["status"] == "finished"


@pytest.mark.usefixtures("no_ambient_trust")
def test_without_trainwire_ca_the_client_refuses_the_untrusted_certificate(
    tls_server: TLSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainwire.client")
    waiter = _Waiter("certificate verify failed")
    logging.getLogger("trainwire.client").addHandler(waiter)
    try:
        run = trainwire.init(project="tls", name="untrusted", url=tls_server.url)
        run.log({"loss": 1.0})
        assert waiter.seen.wait(10_000 * MS), caplog.text
        run.finish(timeout=50 * MS)  # returns, and does not raise
    finally:
        logging.getLogger("trainwire.client").removeHandler(waiter)
    assert not run.delivered
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert tls_server.get_json("/api/runs") == []  # nothing got through


@pytest.mark.parametrize("ca", ["missing.pem", "not-a-certificate.pem"])
def test_a_trainwire_ca_that_cannot_be_used_is_named_and_the_rows_are_kept(
    tls_server: TLSServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ca: str,
) -> None:
    """Not "server unreachable ([Errno 2] No such file or directory)", which sent the
    user looking at the server."""
    (tmp_path / "not-a-certificate.pem").write_text("not a certificate\n")
    monkeypatch.setenv("TRAINWIRE_CA", str(tmp_path / ca))
    caplog.set_level(logging.WARNING, logger="trainwire.client")
    waiter = _Waiter("trainwire_ca=")
    logging.getLogger("trainwire.client").addHandler(waiter)
    try:
        run = trainwire.init(project="tls", url=tls_server.url, resume="earlier-run")
        run.log({"loss": 1.0})
        assert waiter.seen.wait(10_000 * MS), caplog.text
        run.finish(timeout=50 * MS)
    finally:
        logging.getLogger("trainwire.client").removeHandler(waiter)
    said = [
        r.getMessage() for r in caplog.records if f"TRAINWIRE_CA={tmp_path / ca}" in r.getMessage()
    ]
    assert any("last step" in message for message in said), caplog.text  # the resume read
    assert any("ws/ingest" in message for message in said), caplog.text  # the sender
    assert not run.delivered
    assert run.path.exists()  # kept for trainwire sync


def test_a_dashboard_socket_over_wss_is_served(tls_server: TLSServer) -> None:
    with connect(
        f"{tls_server.wss_url}/ws/dashboard",
        ssl=tls_server.trusting,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        origin=Origin(tls_server.url),
        open_timeout=10_000 * MS,
    ) as ws:
        assert json.loads(ws.recv(timeout=10_000 * MS))["type"] == "hello"
        assert json.loads(ws.recv(timeout=10_000 * MS)) == {"type": "runs", "runs": []}


def test_over_wss_the_plain_http_origin_of_the_same_host_is_refused(tls_server: TLSServer) -> None:
    """The page's origin is https: an http page on the same host and port is another one."""
    plain = tls_server.url.replace("https://", "http://")
    with connect(
        f"{tls_server.wss_url}/ws/dashboard",
        ssl=tls_server.trusting,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        origin=Origin(plain),
        open_timeout=10_000 * MS,
    ) as ws:
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=10_000 * MS)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4403
    assert plain in info.value.rcvd.reason


@pytest.mark.usefixtures("no_ambient_trust")
def test_a_wss_client_without_the_ca_fails_the_handshake(tls_server: TLSServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(
            f"{tls_server.wss_url}/ws/dashboard",
            ssl=ssl.create_default_context(),
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            open_timeout=10_000 * MS,
        )


def test_over_https_the_token_cookie_is_secure(tls_server: TLSServer) -> None:
    reply = tls_server.get(f"/?token={TOKEN}")
    assert reply.status == 303
    assert reply.headers["location"] == "/"
    cookie = reply.headers["set-cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert {"secure", "httponly", "samesite=strict"} <= set(attributes), cookie


@pytest.mark.usefixtures("no_ambient_trust")
@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8765", "ws://10.1.2.3:8765", "http://example.org"]
)
def test_plain_http_to_another_machine_is_refused_before_anything_is_sent(url: str) -> None:
    with pytest.raises(trainwire.ConfigError, match="refusing plain") as info:
        trainwire.init(project="tls", url=url)
    assert "insecure=True" in str(info.value)
    with pytest.raises(trainwire.ConfigError):
        trainwire.init(project="tls", url=url, insecure=False)


def test_trainwire_insecure_0_does_not_allow_plain_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINWIRE_INSECURE", "0")
    with pytest.raises(trainwire.ConfigError, match="refusing plain"):
        trainwire.init(project="tls", url="http://10.1.2.3:8765")


@pytest.mark.parametrize(
    ("url", "insecure", "endpoint"),
    [
        # Accepted only when insecure: checked on the pure function, so nothing
        # ever tries to reach 10.1.2.3.
        ("http://10.1.2.3:8765", True, "ws://10.1.2.3:8765/ws/ingest"),
        ("https://10.1.2.3:8765", False, "wss://10.1.2.3:8765/ws/ingest"),
        ("https://trainwire.example/base/", False, "wss://trainwire.example/base/ws/ingest"),
        ("http://127.0.0.1:8765", False, "ws://127.0.0.1:8765/ws/ingest"),
        ("http://localhost:8765", False, "ws://localhost:8765/ws/ingest"),
        ("http://[::1]:8765", False, "ws://[::1]:8765/ws/ingest"),
    ],
)
def test_the_ingest_endpoint_of_an_allowed_url(url: str, insecure: bool, endpoint: str) -> None:
    assert _ingest_url(url, insecure=insecure) == endpoint


def test_the_ingest_endpoint_refuses_other_schemes() -> None:
    with pytest.raises(trainwire.ConfigError, match="http:// or https://"):
        _ingest_url("ftp://127.0.0.1:8765", insecure=True)
