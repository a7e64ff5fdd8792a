"""DELETE of a run whose writer goes on, over real sockets (uvicorn)."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
from websockets.sync.client import connect

from tests.conftest import MS, TOKEN, LiveServer
from tests.server.conftest import live_trainer
from trainwire.protocol.messages import (
    Ack,
    Batch,
    RunSpec,
    ServerToTrainer,
)
from trainwire.storage import SQLiteStore

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = RunSpec(id="run-1", project="p", name="n", config={})
OTHER = RunSpec(id="other", project="p", name="n", config={})


class SlowPurge(SQLiteStore):
    """Once armed, a purge lasts until the deleted run's writer has opened it anew:
    the purge of a big run (seconds) outlasts a writer's reconnection (0.1 s)."""

    def __init__(self, path: Path) -> None:
        self.purging = threading.Event()
        self.reopened = threading.Event()
        self.armed = False
        super().__init__(path)

    def open_run(self, spec: RunSpec, *args: Any, **kwargs: Any) -> int:
        last_seq = super().open_run(spec, *args, **kwargs)
        if self.armed and spec.id == SPEC.id:
            self.reopened.set()
        return last_seq

    def purge_deleted(self) -> None:
        if self.armed:
            self.purging.set()
            assert self.reopened.wait(5000 * MS)
        super().purge_deleted()


def from_server(ws: Any) -> ServerToTrainer:
    return msgspec.msgpack.decode(ws.recv(5), type=ServerToTrainer)


def delete(server: LiveServer, run_id: str) -> int:
    request = urllib.request.Request(
        f"{server.url}/api/runs/{run_id}", method="DELETE", headers=AUTH
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


def test_dashboards_are_told_of_a_delete_before_its_writer_opens_the_run_anew(
    tmp_path: Path,
) -> None:
    """Told once the points were gone, every dashboard dropped the run that its
    writer, reconnected meanwhile, had opened anew: gone from their lists, and its
    charts, while it was being written to."""
    server = LiveServer(data_dir=tmp_path, store_type=SlowPurge)
    server.start()
    store = server.store
    assert isinstance(store, SlowPurge)
    try:
        with (
            live_trainer(server.ws_url, SPEC) as (writer, _),
            live_trainer(server.ws_url, OTHER) as (other, _),
            connect(server.ws_url + "/ws/dashboard", additional_headers=AUTH) as dash,
        ):
            writer.send(msgspec.msgpack.encode(Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})])))
            assert from_server(writer) == Ack(seq=1)
            dash.recv(5), dash.recv(5)  # hello, runs
            dash.send(json.dumps({"type": "subscribe", "run": OTHER.id, "after": 0}))
            assert json.loads(dash.recv(5))["seq"] == 0  # its snapshot: nothing yet
            store.armed = True
            answers: list[int] = []
            deleting = threading.Thread(target=lambda: answers.append(delete(server, SPEC.id)))
            deleting.start()
            assert store.purging.wait(5000 * MS)
            with live_trainer(server.ws_url, SPEC) as (again, welcome):  # the writer goes on
                assert welcome.new_run
                deleting.join(5000 * MS)
                assert answers == [204]
                # A commit of another run: its points frame comes after every run
                # frame published before it.
                other.send(msgspec.msgpack.encode(Batch(seq=1, rows=[(0, 1.0, {"y": 1.0})])))
                assert from_server(other) == Ack(seq=1)
                told = []
                while True:
                    frame = json.loads(dash.recv(5))
                    if frame["type"] == "points" and frame["run"] == OTHER.id:
                        break
                    if frame["type"] == "run" and frame["run"]["id"] == SPEC.id:
                        told.append(frame["run"]["status"])
                assert told and told[-1] == "running", told  # the run made anew
    finally:
        server.stop()
