from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from websockets.sync.client import connect

from tests.conftest import TOKEN
from trainwire.protocol.messages import PROTOCOL_VERSION, Hello, RunSpec, ServerToTrainer, Welcome
from trainwire.server.app import create_app
from trainwire.settings import Limits, Settings

SPEC = RunSpec(id="run-1", project="digits", name="cnn", config={"lr": 0.003})


ADMIN_TOKEN = "test-admin-token"


def app_settings(tmp_path: Path, *, run_update_interval: float = 3600.0, **limits: int) -> Settings:
    # Commits re-announce their run to dashboards once per interval: an hour, so that
    # a slow machine never slips one in between the frames a test expects.
    return Settings(
        data_dir=tmp_path,
        token=ADMIN_TOKEN,
        run_update_interval=run_update_interval,
        limits=Limits(max_frame_bytes=64 * 1024, **limits),
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The app in-process: no port, no thread of our own; requests carry the admin token."""
    app = create_app(app_settings(tmp_path))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as test_client:
        yield test_client


def send(ws: WebSocketTestSession, message: object) -> None:
    ws.send_bytes(msgspec.msgpack.encode(message))


def receive(ws: WebSocketTestSession) -> ServerToTrainer:
    return msgspec.msgpack.decode(ws.receive_bytes(), type=ServerToTrainer)


@contextlib.contextmanager
def open_trainer(client: TestClient, spec: RunSpec = SPEC) -> Iterator[WebSocketTestSession]:
    """A trainer connection, already welcomed."""
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, Hello(v=PROTOCOL_VERSION, run=spec))
        receive(ws)
        yield ws


@contextlib.contextmanager
def live_trainer(ws_url: str, spec: RunSpec = SPEC) -> Iterator[tuple[Any, Welcome]]:
    """A trainer's connection to a live server (``LiveServer.ws_url``), and the welcome
    to its hello."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with connect(ws_url + "/ws/ingest", additional_headers=auth) as ws:
        ws.send(msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=spec)))
        welcome = msgspec.msgpack.decode(ws.recv(5), type=ServerToTrainer)
        assert isinstance(welcome, Welcome), welcome
        yield ws, welcome
