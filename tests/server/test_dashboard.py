from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import ADMIN_TOKEN, SPEC, app_settings, open_trainer, receive, send
from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Ack, Batch, Finish, RunSpec
from trainwire.server.app import create_app
from trainwire.server.fanout import DashboardFeed
from trainwire.server.ingest import BIG_BATCH_VALUES, BIG_FRAME_BYTES
from trainwire.settings import Limits
from trainwire.storage import SQLiteStore


def log_batch(trainer: WebSocketTestSession, seq: int, *steps: int) -> None:
    send(
        trainer, Batch(seq=seq, rows=[(s, float(s), {"train/loss": 1.0 / (s + 1)}) for s in steps])
    )
    receive(trainer)


def open_dashboard(client: TestClient) -> Any:
    return client.websocket_connect("/ws/dashboard")


def greeting(dash: WebSocketTestSession) -> list[dict[str, Any]]:
    hello = dash.receive_json()
    assert hello["type"] == "hello" and hello["v"] == 1
    runs = dash.receive_json()
    assert runs["type"] == "runs"
    return runs["runs"]  # type: ignore[no-any-return]


def steps(frame: dict[str, Any]) -> list[int]:
    return frame["series"]["train/loss"]["step"]  # type: ignore[no-any-return]


def test_dashboard_gets_runs_then_a_snapshot_then_live_deltas(client: TestClient) -> None:
    with open_trainer(client) as trainer:
        log_batch(trainer, 1, 0, 1)
        with open_dashboard(client) as dash:
            [run] = greeting(dash)
            assert (run["id"], run["name"], run["status"]) == ("run-1", "cnn", "running")
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
            snapshot = dash.receive_json()
            assert (snapshot["type"], snapshot["seq"], steps(snapshot)) == ("points", 1, [0, 1])
            log_batch(trainer, 2, 2)
            delta = dash.receive_json()
            assert (delta["seq"], steps(delta)) == (2, [2])
            send(trainer, Finish(seq=3))
            receive(trainer)
            update = dash.receive_json()
            assert update["type"] == "run" and update["run"]["status"] == "finished"


def test_a_live_delta_holds_only_the_values_stored(tmp_path: Path) -> None:
    """Keys past the run's limit are not stored: a dashboard must not draw what a
    reload would not show."""
    app = create_app(app_settings(tmp_path, max_series_per_run=1))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        with open_trainer(client) as trainer:
            log_batch(trainer, 1, 0)
            with open_dashboard(client) as dash:
                greeting(dash)
                dash.send_json({"type": "subscribe", "run": "run-1", "after": 1})
                rows = [(1, 1.0, {"train/loss": 0.5, "extra": 1.0}), (2, 2.0, {"extra": 2.0})]
                send(trainer, Batch(seq=2, rows=rows))
                assert receive(trainer) == Ack(seq=2, refused=["extra"])
                delta = dash.receive_json()
                assert (delta["seq"], list(delta["series"]), steps(delta)) == (
                    2,
                    ["train/loss"],
                    [1],
                )


class StoreUnreadableOnce(SQLiteStore):
    """Its first catch-up read fails, as on a disk error; later ones succeed."""

    failed = False

    def columns_after(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise StorageError("disk I/O error")
        return super().columns_after(*args, **kwargs)


def test_a_dashboard_whose_catch_up_fails_is_closed_with_the_reason_not_left_silent(
    tmp_path: Path,
) -> None:
    """Its sender task died and the socket stayed open: the page showed itself live
    while nothing more came, for good. Closed, the page reconnects and resumes."""
    app = create_app(app_settings(tmp_path), store=StoreUnreadableOnce(tmp_path / "t.db"))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        with open_trainer(client) as trainer:
            log_batch(trainer, 1, 0, 1)
            with open_dashboard(client) as dash:
                greeting(dash)
                dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
                with pytest.raises(WebSocketDisconnect) as closed:
                    dash.receive_json()
            assert (closed.value.code, closed.value.reason) == (
                1011,
                "server storage error: disk I/O error",
            )
            with open_dashboard(client) as dash:
                greeting(dash)
                dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
                assert steps(dash.receive_json()) == [0, 1]


def test_a_dashboard_whose_sender_fails_on_a_bug_is_closed_not_left_silent(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RuntimeError is also what a send on a closed socket raises: one raised on an
    open socket (a bug) must close it too, not end its sender in silence."""

    async def fails(self: DashboardFeed, run_id: str, *, snapshot: bool) -> None:
        raise RuntimeError("dictionary changed size during iteration")

    monkeypatch.setattr(DashboardFeed, "_catch_up", fails)
    with open_trainer(client) as trainer:
        log_batch(trainer, 1, 0)
        with open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
            with pytest.raises(WebSocketDisconnect) as closed:
                dash.receive_json()
    assert (closed.value.code, closed.value.reason) == (1011, "server error")


def test_a_reconnecting_dashboard_resumes_without_gap_or_duplicate(client: TestClient) -> None:
    with open_trainer(client) as trainer:
        log_batch(trainer, 1, 0)
        with open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1"})
            assert steps(dash.receive_json()) == [0]
        # While the dashboard is away, the run goes on.
        log_batch(trainer, 2, 1)
        log_batch(trainer, 3, 2)
        with open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 1})
            missed = dash.receive_json()
            assert (missed["seq"], steps(missed)) == (3, [1, 2])
            log_batch(trainer, 4, 3)
            assert steps(dash.receive_json()) == [3]


def test_a_new_run_appears_on_open_dashboards(client: TestClient) -> None:
    with open_dashboard(client) as dash:
        assert greeting(dash) == []
        with open_trainer(client, RunSpec(id="new", project="p", name="<b>x</b>")):
            update = dash.receive_json()
            assert update["type"] == "run" and update["run"]["name"] == "<b>x</b>"


def test_subscribing_to_a_run_not_yet_created_waits_for_it(client: TestClient) -> None:
    with open_dashboard(client) as dash:
        greeting(dash)
        dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
        empty = dash.receive_json()
        assert (empty["type"], empty["seq"], empty["series"]) == ("points", 0, {})
        with open_trainer(client, SPEC) as trainer:
            assert dash.receive_json()["type"] == "run"
            log_batch(trainer, 1, 0)
            assert steps(dash.receive_json()) == [0]


def test_unsubscribed_runs_are_not_sent(client: TestClient) -> None:
    with open_trainer(client) as trainer, open_dashboard(client) as dash:
        greeting(dash)
        dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
        dash.receive_json()
        dash.send_json({"type": "unsubscribe", "run": "run-1"})
        log_batch(trainer, 1, 0)
        # An error reply proves the unsubscribe was handled and no points came first.
        dash.send_json({"type": "nonsense"})
        assert dash.receive_json()["type"] == "error"


def test_bad_dashboard_messages_get_an_error_and_the_connection_stays(client: TestClient) -> None:
    with open_trainer(client) as trainer, open_dashboard(client) as dash:
        greeting(dash)
        dash.send_text("{not json")
        error = dash.receive_json()
        assert error["type"] == "error" and "bad dashboard message" in error["message"]
        dash.send_bytes(b"\x00")
        assert dash.receive_json() == {
            "type": "error",
            "message": "dashboard frames must be JSON text",
        }
        dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
        assert dash.receive_json()["type"] == "points"
        log_batch(trainer, 1, 5)
        assert steps(dash.receive_json()) == [5]


def test_a_big_batch_is_decoded_and_framed_off_the_event_loop_and_arrives_whole(
    tmp_path: Path,
) -> None:
    """Over BIG_FRAME_BYTES and BIG_BATCH_VALUES, both steps run in the thread pool:
    the same points reach the dashboard as by the event loop's own path."""
    settings = replace(app_settings(tmp_path), limits=Limits(max_frame_bytes=16 << 20))
    rows = [(s, float(s), {f"k{i}": float(s * i) for i in range(100)}) for s in range(1000)]
    big = Batch(seq=1, rows=rows)  # type: ignore[arg-type]
    assert len(msgspec.msgpack.encode(big)) > BIG_FRAME_BYTES
    assert sum(len(values) for _, _, values in rows) > BIG_BATCH_VALUES
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        with open_trainer(client) as trainer, open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
            assert dash.receive_json()["series"] == {}
            send(trainer, big)
            assert receive(trainer) == Ack(seq=1)
            live = dash.receive_json()
            assert live["seq"] == 1
            assert live["series"]["k99"]["step"] == list(range(1000))
            assert live["series"]["k99"]["value"] == [float(s * 99) for s in range(1000)]


def test_a_big_snapshot_comes_in_parts_each_resumable_from_its_seq(client: TestClient) -> None:
    """Everything since `after`, as one frame, held the server for seconds on a run of
    millions of points (the loop and the GIL, for every trainer and dashboard). It
    comes in parts of at most CATCH_UP_VALUES values, cut between commits; each part's
    seq is a commit a dashboard may resume after."""
    batch_rows = 1000
    with open_trainer(client) as trainer:
        for seq in range(1, 121):  # 120,000 points
            first = (seq - 1) * batch_rows
            log_batch(trainer, seq, *range(first, first + batch_rows))
        with open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 0})
            frames = [dash.receive_json() for _ in range(3)]
        assert [f["seq"] for f in frames] == [50, 100, 120]  # 50 batches (50,000) a part
        assert [s for f in frames for s in steps(f)] == list(range(120 * batch_rows))
        with open_dashboard(client) as dash:  # one that dropped after the first part
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": 50})
            frames = [dash.receive_json() for _ in range(2)]
        assert [f["seq"] for f in frames] == [100, 120]
        assert [s for f in frames for s in steps(f)] == list(range(50_000, 120_000))
