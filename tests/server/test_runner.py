"""The server's listening socket (``trainwire.server.runner.bind``)."""

from __future__ import annotations

import asyncio
import socket

from tests.conftest import MS
from trainwire.server.runner import bind


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
