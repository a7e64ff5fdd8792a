from __future__ import annotations

import math

import msgspec
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import SPEC, open_trainer, receive, send
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Finish,
    Hello,
    RunSpec,
    Welcome,
)
from trainwire.server.ingest import RunUpdates


def test_trainer_is_welcomed_and_each_batch_acked_after_it_is_stored(client: TestClient) -> None:
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
        assert receive(ws) == Welcome(v=PROTOCOL_VERSION, run_id="run-1", last_seq=0)
        send(ws, Batch(seq=1, rows=[(0, 1.0, {"loss": 2.0}), (1, 2.0, {"loss": math.nan})]))
        assert receive(ws) == Ack(seq=1)
        # The ack means stored: the REST API already has the points.
        values = client.get("/api/runs/run-1/metrics").json()["series"]["loss"]["value"]
        assert values == [2.0, "NaN"]
        send(ws, Finish(seq=2))
        assert receive(ws) == Ack(seq=2)
    assert client.get("/api/runs").json()[0]["status"] == "finished"


def test_a_reconnecting_trainer_learns_what_is_stored_and_duplicates_are_ignored(
    client: TestClient,
) -> None:
    with open_trainer(client) as ws:
        send(ws, Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))
        receive(ws)
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
        assert receive(ws) == Welcome(v=PROTOCOL_VERSION, run_id="run-1", last_seq=1)
        send(ws, Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))  # resent: acked, not stored
        assert receive(ws) == Ack(seq=1)
    assert client.get("/api/runs/run-1/metrics").json()["series"]["loss"]["step"] == [0]


def closes_with(client: TestClient, frames: list[bytes | str]) -> tuple[int, str]:
    with client.websocket_connect("/ws/ingest") as ws:
        for frame in frames:
            if isinstance(frame, str):
                ws.send_text(frame)
            else:
                ws.send_bytes(frame)
        with pytest.raises(WebSocketDisconnect) as info:
            while True:
                ws.receive_bytes()
    return info.value.code, info.value.reason


HELLO = msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=SPEC))


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        (
            [msgspec.msgpack.encode(Hello(v=7, run=SPEC))],
            4001,
            "unsupported protocol version 7; this server speaks 1",
        ),
        ([b"\xc1garbage"], 1003, "malformed frame"),
        ([msgspec.msgpack.encode({"type": "reboot"})], 1003, "malformed frame"),
        (["hello"], 1003, "trainer frames must be binary msgpack, not text"),
        ([msgspec.msgpack.encode(Batch(seq=1, rows=[]))], 1008, "batch before hello"),
        (
            [
                HELLO,
                msgspec.msgpack.encode({"type": "batch", "seq": 1, "rows": [[0, 0.0, {"a": "b"}]]}),
            ],
            1003,
            "malformed frame: Expected `float`, got `str`",
        ),
        ([HELLO, b"\x00" * (64 * 1024 + 1)], 1009, "frame of 65537 bytes exceeds 65536"),
    ],
)
def test_bad_input_gets_a_clear_close_reason_and_the_server_keeps_serving(
    client: TestClient, frames: list[bytes | str], code: int, reason: str
) -> None:
    with open_trainer(client, RunSpec(id="good", project="p", name="n")) as good:
        got_code, got_reason = closes_with(client, frames)
        assert got_code == code
        assert got_reason.startswith(reason)
        # The well-behaved trainer is still served, and what was stored is intact.
        send(good, Batch(seq=1, rows=[(0, 0.0, {"x": 1.0})]))
        assert receive(good) == Ack(seq=1)
    assert client.get("/api/runs/good/metrics").json()["series"]["x"]["value"] == [1.0]


def test_a_committing_run_is_announced_at_most_once_per_interval() -> None:
    updates = RunUpdates(interval=1.0)
    assert updates.due("a", now=10.0)  # never announced
    assert not updates.due("a", now=10.5)
    assert updates.due("b", now=10.5)  # each run on its own clock
    assert updates.due("a", now=11.0)
    updates.announced("a", now=11.8)  # e.g. its run frame went out when it finished
    assert not updates.due("a", now=12.2)
    assert updates.due("a", now=12.8)


def test_run_announcements_forget_old_runs_without_changing_an_answer() -> None:
    updates = RunUpdates(interval=1.0)
    for n in range(3000):
        assert updates.due(f"run{n}", now=n * 0.01)
    assert not updates.due("run2999", now=30.0)  # announced 0.01 s ago
    assert updates.due("run0", now=30.0)
    assert len(updates._announced) < 1500
