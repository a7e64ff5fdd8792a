"""Shared fixtures: a real server on port 0, in a thread of the test process."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from trainwire.server.app import create_app
from trainwire.server.runner import bind, server_url, uvicorn_config
from trainwire.settings import Settings
from trainwire.storage import SQLiteStore

# The admin token of every LiveServer; the clients find it in TRAINWIRE_TOKEN.
TOKEN = "live-server-token"

# Where browser tests save screenshots for a person to look at (git-ignored).
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"

# Every timeout in the suite is a multiple of this, scaled for slow CI machines.
MS = 0.001 * float(os.environ.get("TRAINWIRE_TESTS_TIMEOUT_FACTOR", "1"))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 10 * MS) -> bool:
    """Poll ``condition`` until it holds; False if ``timeout`` seconds pass first.

    Only for states that send no event a test could wait on: another process
    answering HTTP, rows another process writes, a thread's state. The interval
    bounds the cost of polling and the deadline bounds the wait.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
    return True


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own client data directory, and no ambient trainwire or
    launcher settings from the developer's shell."""
    for variable in (
        "TRAINWIRE_URL",
        "TRAINWIRE_MODE",
        "TRAINWIRE_RUN_ID",
        "TRAINWIRE_PORT",
        "RANK",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "SLURM_JOB_ID",
    ):
        monkeypatch.delenv(variable, raising=False)
    data = tmp_path / "client-data"
    monkeypatch.setenv("TRAINWIRE_DATA", str(data))
    monkeypatch.setenv("TRAINWIRE_TOKEN", TOKEN)
    # A sampler thread per run would add keys to every run; its own test turns it on.
    monkeypatch.setenv("TRAINWIRE_SYSTEM_METRICS", "0")
    return data


@dataclass
class LiveServer:
    """A real trainwire server (uvicorn, real sockets) on a free port.

    ``stop()`` and ``start()`` restart it on the same port and data directory, as a
    server restart would.
    """

    data_dir: Path
    port: int = 0
    heartbeat_timeout: float = 60.0
    # A test's own store (one that fails on purpose), made on the data directory.
    store_type: type[SQLiteStore] = SQLiteStore
    url: str = ""
    store: SQLiteStore = field(init=False)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        settings = Settings(
            port=self.port,
            data_dir=self.data_dir,
            heartbeat_timeout=self.heartbeat_timeout,
            token=TOKEN,
        )
        self.store = self.store_type(settings.db_path)
        # Bound here, before the thread starts: the port is known at once, and
        # connections made before uvicorn is ready wait in the backlog.
        sock = bind("127.0.0.1", self.port)
        self.url = server_url(sock)
        self.port = sock.getsockname()[1]
        config = uvicorn_config(create_app(settings, store=self.store), settings)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10_000 * MS)
        assert not self._thread.is_alive(), "server did not stop"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authenticate a raw client."""
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """For a test that times a call on the training thread: the heap this process has
    built so far (several hundred thousand objects left by earlier tests, torch's and
    the in-process servers' among them) moved out of the collector's reach. A full
    collection scans every one of them and holds the GIL throughout: 0.2-0.7 s
    measured late in this suite, which lands in whatever call the training thread is
    in. A training script's heap is not this one; objects made from here on are
    collected as usual."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def hung_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A name lookup of ``*.hung.invalid`` that does not answer (a DNS server dropping
    packets), until the test ends; every other lookup as usual. Yields the names
    looked up, one entry per lookup that reached the resolver."""
    real, released, asked = socket.getaddrinfo, threading.Event(), []

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host.endswith(".hung.invalid") and not kwargs.get("flags"):
            asked.append(host)
            released.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked
    released.set()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(data_dir=tmp_path / "server-data")
    server.start()
    yield server
    server.stop()


# Debian's Chromium, with the flags this sandboxed, offline machine needs.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, driven by Playwright (which downloads nothing here).

    Per module, not per session: Playwright's sync API keeps an event loop running in
    the main thread while it lives, and tests that call asyncio.run() would fail."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True
        )
        yield launched
        launched.close()
