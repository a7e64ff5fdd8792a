"""Running the server: its listening socket, the dashboard link it prints."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MS
from trainwire.server.app import create_app
from trainwire.server.runner import bind, dashboard_link, machine_name, public_url, server_url
from trainwire.settings import Settings


def test_connections_accepted_from_the_bound_socket_have_nagle_off() -> None:
    """uvicorn serves on the socket bind() makes; asyncio turns Nagle off for the
    connections it accepts only if that socket says it is TCP. With Nagle on, the
    second of two small frames waited 40 ms for the peer's delayed ACK."""

    async def nodelay_of_an_accepted_connection() -> int:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = bind("127.0.0.1", 0)
        server = await loop.create_server(Probe, sock=listener)
        try:
            port = listener.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5000 * MS):
                return await asyncio.wait_for(accepted, 5000 * MS)
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0


@pytest.mark.parametrize("token", ["q8Z+v3/Yx1w=", "a b&c#d%e", "plain-token_1"])
def test_the_printed_dashboard_link_logs_in_with_any_token(tmp_path: Path, token: str) -> None:
    """A token of `openssl rand -base64 32` (`--token`, TRAINWIRE_TOKEN) holds "+",
    which the link carried as it was and the server read as a space: 401."""
    link = dashboard_link("http://testserver", token)
    app = create_app(Settings(data_dir=tmp_path, token=token))
    with TestClient(app, follow_redirects=False) as client:
        response = client.get(link)
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        assert client.get("/api/runs").status_code == 200  # with the cookie it set


def test_a_server_bound_to_every_interface_names_this_machine_for_the_others() -> None:
    """Its link read 127.0.0.1, which sends a colleague (and the token in the link)
    to their own machine."""
    with bind("0.0.0.0", 0) as everywhere, bind("127.0.0.1", 0) as loopback:
        port = everywhere.getsockname()[1]
        assert server_url(everywhere) == f"http://127.0.0.1:{port}"  # for this machine
        assert public_url(everywhere, tls=True) == f"https://{machine_name()}:{port}"
        assert public_url(loopback) is None  # server_url names its one address


@pytest.mark.parametrize(
    ("fqdn", "named"),
    [
        ("gpu-7.lab.example", "gpu-7.lab.example"),
        ("localhost", "gpu-7"),  # /etc/hosts: 127.0.0.1 gpu-7 (a container's)
        ("localhost.localdomain", "gpu-7"),  # 127.0.0.1 localhost localhost.localdomain gpu-7
        ("ip6-localhost", "gpu-7"),
    ],
)
def test_the_link_for_other_machines_never_names_localhost(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, named: str
) -> None:
    """Where the host name resolved to 127.0.0.1, getfqdn() said "localhost": the link
    "from other machines" (and every share link) sent a colleague to their own.
    Which name a machine's resolver gives cannot be set up here: getfqdn is replaced."""
    monkeypatch.setattr(socket, "getfqdn", lambda name="": fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-7")
    assert machine_name() == named
    with bind("0.0.0.0", 0) as everywhere:
        assert public_url(everywhere) == f"http://{named}:{everywhere.getsockname()[1]}"
