"""Storage errors over real sockets (uvicorn), not Starlette's test client."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import TOKEN, LiveServer
from tests.server.conftest import live_trainer
from trainwire.exceptions import StorageError
from trainwire.protocol.messages import PROTOCOL_VERSION, Batch, Hello, RunSpec
from trainwire.storage import SQLiteStore

SPEC = RunSpec(id="run-1", project="p", name="n", config={})


@contextlib.contextmanager
def serving(tmp_path: Path, store_type: type[SQLiteStore]) -> Iterator[str]:
    """A live server on ``store_type``; its ws:// URL. Stopped (every connection
    handled to its end) before the test asserts on the log."""
    server = LiveServer(data_dir=tmp_path, store_type=store_type)
    server.start()
    try:
        yield server.ws_url
    finally:
        server.stop()


def close_of(ws: Any) -> tuple[int, str]:
    """The close code and reason the server ended ``ws`` with, at its next frame."""
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CatchUpFails(SQLiteStore):
    def columns_after(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError("disk I/O error")


class ListFails(SQLiteStore):
    def runs_json(self) -> bytes:
        raise StorageError("database is locked")


class AppendFails(SQLiteStore):
    def append_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError("database or disk is full")


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()} {r.exc_info!r}" for r in caplog.records if r.exc_info]


def test_catch_up_failure_closes_1011_over_real_sockets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, CatchUpFails) as url:
        with live_trainer(url, SPEC):  # the run exists, opened by its trainer
            with connect(url + "/ws/dashboard", additional_headers=AUTH) as dash:
                dash.recv(5), dash.recv(5)
                dash.send(json.dumps({"type": "subscribe", "run": "run-1", "after": 0}))
                assert close_of(dash) == (1011, "server storage error: disk I/O error")
    assert tracebacks(caplog) == []


def test_list_failure_at_dashboard_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, ListFails) as url:
        with connect(url + "/ws/dashboard", additional_headers=AUTH) as dash:
            dash.recv(5)
            code, reason = close_of(dash)
            assert code == 1011 and "storage error" in reason
    assert tracebacks(caplog) == []


def test_ingest_failure_closes_1011_over_real_sockets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, AppendFails) as url:
        with live_trainer(url, SPEC) as (trainer, _):
            trainer.send(msgspec.msgpack.encode(Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})])))
            assert close_of(trainer) == (1011, "server storage error: database or disk is full")
    assert tracebacks(caplog) == []


def test_normal_disconnects_log_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serving(tmp_path, SQLiteStore) as url:
        with live_trainer(url, SPEC) as (trainer, _):
            trainer.send(msgspec.msgpack.encode(Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})])))
            trainer.recv(5)
            with connect(url + "/ws/dashboard", additional_headers=AUTH) as dash:
                dash.recv(5), dash.recv(5)
                dash.send(json.dumps({"type": "subscribe", "run": "run-1", "after": 0}))
                dash.recv(5)
        # abrupt drops, no closing handshake
        for path in ("/ws/dashboard", "/ws/ingest"):
            with contextlib.suppress(Exception), connect(url + path, additional_headers=AUTH) as ws:
                if path == "/ws/ingest":
                    ws.send(msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=SPEC)))
                ws.recv(5)
                ws.socket.close()
    assert tracebacks(caplog) == []  # the server stopped: every drop was handled
