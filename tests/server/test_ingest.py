from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import ADMIN_TOKEN, SPEC, app_settings, open_trainer, receive, send
from trainwire.exceptions import StorageError
from trainwire.protocol.limits import MAX_CONFIG_DEPTH
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Finish,
    Hello,
    RunInfo,
    RunSpec,
    Welcome,
)
from trainwire.server.app import create_app
from trainwire.server.ingest import RunUpdates
from trainwire.server.watch import RunWatch
from trainwire.storage import Commit, SQLiteStore


def test_trainer_is_welcomed_and_each_batch_acked_after_it_is_stored(client: TestClient) -> None:
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
        # new_run: this hello made the run (a resume that names no run is told so).
        assert receive(ws) == Welcome(v=PROTOCOL_VERSION, run_id="run-1", last_seq=0, new_run=True)
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


def test_a_config_nested_too_deeply_is_refused_and_every_run_stays_readable(
    client: TestClient,
) -> None:
    with open_trainer(client):  # an honest run
        pass
    # The deepest config the decoder takes (how deep depends on the stack below it)
    # was stored, then encoded again for the run list deeper in the stack, out of
    # recursion: a 500 for every user, for good. Down from beyond the decoder's reach:
    for depth in range(1000, MAX_CONFIG_DEPTH, -1):
        deep = msgspec.Raw(b"\x91" * depth + b"\x01")  # [[[...[1]...]]]
        run = {"id": "evil", "project": "p", "name": "n", "config": {"x": deep}}
        with client.websocket_connect("/ws/ingest") as ws:
            send(ws, {"type": "hello", "v": PROTOCOL_VERSION, "run": run})
            with pytest.raises(WebSocketDisconnect) as closed:
                receive(ws)  # a welcome: the run is stored
        if not closed.value.reason.startswith("malformed frame"):  # the decoder took it
            break
    assert (closed.value.code, closed.value.reason) == (1003, "config nested deeper than 32 levels")
    assert [listed["id"] for listed in client.get("/api/runs").json()] == [SPEC.id]
    assert client.get(f"/api/runs/{SPEC.id}").status_code == 200
    assert client.get("/api/runs/evil").status_code == 404


def test_a_writer_whose_run_is_deleted_is_told_so_and_its_hello_opens_the_run_anew(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """It was closed 1011 "server storage error: no stream ...", an ERROR in the
    server's log for what was an admin's DELETE."""
    with open_trainer(client) as ws, open_trainer(client, RunSpec("other", "p", "n")) as other:
        send(ws, Batch(seq=1, rows=[(0, 0.0, {"x": 1.0})]))
        assert receive(ws) == Ack(seq=1)
        assert client.delete(f"/api/runs/{SPEC.id}").status_code == 204
        send(ws, Batch(seq=2, rows=[(1, 0.0, {"x": 2.0})]))
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
        # Every other writer is served as before.
        send(other, Batch(seq=1, rows=[(0, 0.0, {"x": 1.0})]))
        assert receive(other) == Ack(seq=1)
    assert closed.value.code == 4410
    assert closed.value.reason == "run 'run-1' was deleted; a writer that goes on opens it anew"
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    with client.websocket_connect("/ws/ingest") as ws:  # the writer goes on
        send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
        assert receive(ws) == Welcome(v=PROTOCOL_VERSION, run_id=SPEC.id, last_seq=0, new_run=True)
        send(ws, Batch(seq=2, rows=[(1, 0.0, {"x": 2.0})]))
        assert receive(ws) == Ack(seq=2)
    assert client.get(f"/api/runs/{SPEC.id}/metrics").json()["series"]["x"]["step"] == [1]


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


class StoreThatCannotOpenRuns(SQLiteStore):
    def open_run(self, *args: Any, **kwargs: Any) -> int:
        raise StorageError("disk I/O error")


def test_a_trainer_whose_run_cannot_be_opened_is_not_counted_connected(tmp_path: Path) -> None:
    store = StoreThatCannotOpenRuns(tmp_path / "t.db")
    app = create_app(app_settings(tmp_path), store=store)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app, headers=headers) as client:
        with client.websocket_connect("/ws/ingest") as ws:
            send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
            with pytest.raises(WebSocketDisconnect) as closed:
                receive(ws)
        assert (closed.value.code, closed.value.reason) == (
            1011,
            "server storage error: disk I/O error",
        )
        # Counted connected, it would hold the run back from the reaper for good.
        watch: RunWatch = app.state.watch
        assert watch.overdue([SPEC.id], now=math.inf) == [SPEC.id]


class StoreFullOnce(SQLiteStore):
    """Its first commit of a batch fails as on a full disk; later ones succeed."""

    full = True

    def append_batch(self, *args: Any, **kwargs: Any) -> Commit | None:
        if self.full:
            self.full = False
            raise StorageError("database or disk is full")
        return super().append_batch(*args, **kwargs)


def test_a_batch_the_store_cannot_commit_closes_1011_and_is_stored_once_resent(
    tmp_path: Path,
) -> None:
    """A storage error is nothing the trainer did: a clear close, not a traceback in
    the server's log and a dropped socket, and the batch, unacknowledged, is sent
    again by the client after its backoff."""
    app = create_app(app_settings(tmp_path), store=StoreFullOnce(tmp_path / "t.db"))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        batch = Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})])
        with open_trainer(client) as trainer:
            send(trainer, batch)
            with pytest.raises(WebSocketDisconnect) as closed:
                receive(trainer)
        assert (closed.value.code, closed.value.reason) == (
            1011,
            "server storage error: database or disk is full",
        )
        with open_trainer(client) as trainer:
            send(trainer, batch)
            assert receive(trainer) == Ack(seq=1)
        assert client.get(f"/api/runs/{SPEC.id}/metrics").json()["series"]["x"]["step"] == [0]


class StoreWhoseRunOpensSlowly(SQLiteStore):
    """open_run waits until the run has been looked up twice: two writers of one new
    run (two ranks of a job started together) both asked before it exists."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lookups = 0

    def get_run(self, run_id: str) -> RunInfo | None:
        self.lookups += 1
        return super().get_run(run_id)

    def open_run(self, *args: Any, **kwargs: Any) -> int:
        from tests.conftest import MS, wait_until

        wait_until(lambda: self.lookups >= 2, 5000 * MS)
        return super().open_run(*args, **kwargs)


def test_writers_of_one_new_run_saying_hello_together_count_as_one_new_run(
    tmp_path: Path,
) -> None:
    """Limits: at most N *new runs* a minute. Two streams (ranks) of one new run are
    one new run, however their hellos interleave."""
    store = StoreWhoseRunOpensSlowly(tmp_path / "t.db")
    app = create_app(app_settings(tmp_path, max_new_runs_per_minute=1), store=store)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app, headers=headers) as client:
        with (
            client.websocket_connect("/ws/ingest") as rank0,
            client.websocket_connect("/ws/ingest") as rank1,
        ):
            send(rank0, Hello(v=PROTOCOL_VERSION, run=SPEC, stream="rank-0", rank=0))
            send(rank1, Hello(v=PROTOCOL_VERSION, run=SPEC, stream="rank-1", rank=1))
            welcome = receive(rank0)
            assert isinstance(welcome, Welcome) and welcome.last_seq == 0
            message = rank1.receive()
            assert message["type"] == "websocket.send", message


def test_a_writer_that_ended_its_stream_as_crashed_stays_ended_when_it_says_hello_again(
    client: TestClient,
) -> None:
    """A `finish` with status crashed ends the writer (a script that raised inside
    `with trainwire.init(...)`). Its ack lost with the connection, the client says
    hello again and learns the finish is stored: the run must not go back to running
    (and then wait out the heartbeat timeout to be marked crashed again)."""
    with open_trainer(client) as ws:
        send(ws, Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))
        assert receive(ws) == Ack(seq=1)
        send(ws, Finish(seq=2, status="crashed"))
        assert receive(ws) == Ack(seq=2)
    assert client.get("/api/runs/run-1").json()["status"] == "crashed"
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, Hello(v=PROTOCOL_VERSION, run=SPEC))
        assert receive(ws) == Welcome(v=PROTOCOL_VERSION, run_id="run-1", last_seq=2)
    assert client.get("/api/runs/run-1").json()["status"] == "crashed"


def hello_of(stream: str, *, resume: bool = False, rank: int | None = None) -> Hello:
    return Hello(v=PROTOCOL_VERSION, run=SPEC, stream=stream, rank=rank, resume=resume)


def writer_gone(client: TestClient, hello: Hello, *batches: Batch) -> None:
    """A writer that said ``hello``, sent ``batches``, and vanished without a finish,
    as under kill -9."""
    with client.websocket_connect("/ws/ingest") as ws:
        send(ws, hello)
        receive(ws)
        for batch in batches:
            send(ws, batch)
            assert receive(ws) == Ack(seq=batch.seq)


@pytest.mark.parametrize("lost_first", [False, True], ids=["resumed-at-once", "resumed-late"])
def test_a_run_resumed_after_its_trainer_was_killed_ends_as_its_resumed_writer_does(
    client: TestClient, lost_first: bool
) -> None:
    """A preempted or OOM-killed job, resumed (init(resume=...)) and run to its end,
    read "crashed" for good: the killed process's stream stayed "running", and was
    marked lost by the reaper after the resumed one finished (or was lost already,
    if the resume came after the heartbeat timeout)."""
    store: SQLiteStore = client.app.state.store  # type: ignore[attr-defined]
    writer_gone(client, hello_of("killed"), Batch(seq=1, rows=[(0, 1.0, {"loss": 1.0})]))
    if lost_first:
        store.mark_crashed(SPEC.id, now=100.0)
    with client.websocket_connect("/ws/ingest") as resumed:
        send(resumed, hello_of("resumed", resume=True))
        receive(resumed)
        send(resumed, Finish(seq=1))
        assert receive(resumed) == Ack(seq=1)
    assert client.get(f"/api/runs/{SPEC.id}").json()["status"] == "finished"
    watch: RunWatch = client.app.state.watch  # type: ignore[attr-defined]
    assert SPEC.id not in watch.overdue(store.running_runs(), now=math.inf)


def test_a_resumed_writer_sets_aside_only_writers_not_connected(client: TestClient) -> None:
    """The ranks of a job restarted together each resume the run: one must not set
    aside another that is connected."""
    writer_gone(client, hello_of("gone", rank=1))
    with (
        client.websocket_connect("/ws/ingest") as rank0,
        client.websocket_connect("/ws/ingest") as rank1,
    ):
        send(rank1, hello_of("rank1", rank=1, resume=True))
        receive(rank1)
        send(rank0, hello_of("rank0", rank=0, resume=True))
        receive(rank0)
        send(rank0, Finish(seq=1))
        assert receive(rank0) == Ack(seq=1)
        # rank 1, resumed before rank 0 and still connected, still runs.
        assert client.get(f"/api/runs/{SPEC.id}").json()["status"] == "running"
        send(rank1, Finish(seq=1))
        assert receive(rank1) == Ack(seq=1)
    assert client.get(f"/api/runs/{SPEC.id}").json()["status"] == "finished"


def test_a_writer_that_does_not_resume_leaves_a_vanished_fellow_counting(
    client: TestClient,
) -> None:
    """Another rank, not a resume: a rank that vanished still holds the run, to be
    called crashed by the reaper."""
    store: SQLiteStore = client.app.state.store  # type: ignore[attr-defined]
    writer_gone(client, hello_of("gone", rank=1))
    with client.websocket_connect("/ws/ingest") as rank0:
        send(rank0, hello_of("rank0", rank=0))
        receive(rank0)
        send(rank0, Finish(seq=1))
        assert receive(rank0) == Ack(seq=1)
    assert client.get(f"/api/runs/{SPEC.id}").json()["status"] == "running"
    assert store.mark_crashed(SPEC.id, now=100.0).status == "crashed"  # type: ignore[union-attr]
