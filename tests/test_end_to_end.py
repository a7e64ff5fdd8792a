"""Real sockets: the client's sender thread, uvicorn on port 0, a dashboard socket."""

from __future__ import annotations

import json
import logging
import math
import socket
from typing import Any

import pytest
from websockets.sync.client import connect

import trainwire
from tests.conftest import MS, LiveServer


def test_logged_points_reach_sqlite_and_a_dashboard_socket(live_server: LiveServer) -> None:
    run = trainwire.init(project="e2e", name="live", config={"lr": 0.1}, url=live_server.url)
    assert run.url == f"{live_server.url}/?run={run.id}&token=live-server-token"
    with connect(
        f"{live_server.ws_url}/ws/dashboard",
        additional_headers=live_server.auth,
        open_timeout=5000 * MS,
    ) as dash:
        assert json.loads(dash.recv(5000 * MS))["type"] == "hello"
        assert json.loads(dash.recv(5000 * MS))["type"] == "runs"
        dash.send(json.dumps({"type": "subscribe", "run": run.id, "after": 0}))
        for step in range(300):
            run.log({"train/loss": 1.0 / (step + 1), "lr": 0.1 if step != 7 else math.nan})
        run.finish()
        assert run.delivered
        seen: dict[str, list[Any]] = {"step": [], "value": []}
        last_seq = -1
        while len(seen["step"]) < 300:
            frame = json.loads(dash.recv(5000 * MS))
            if frame["type"] != "points":
                continue
            assert frame["seq"] > last_seq
            last_seq = frame["seq"]
            for key in ("step", "value"):
                seen[key] += frame["series"].get("lr", {}).get(key, [])
    assert seen["step"] == list(range(300))
    assert seen["value"][7] == "NaN" and seen["value"][8] == 0.1
    _, stored = live_server.store.metrics(run.id)
    assert stored["train/loss"].step == list(range(300))
    assert live_server.store.get_run(run.id).status == "finished"  # type: ignore[union-attr]


def test_a_server_restart_mid_run_loses_and_duplicates_nothing(live_server: LiveServer) -> None:
    run = trainwire.init(project="e2e", name="restart", url=live_server.url, flush_interval=0.005)
    for step in range(100):
        run.log({"x": float(step)})
    live_server.stop()
    for step in range(100, 200):  # logged while the server is down
        run.log({"x": float(step)})
    live_server.start()
    for step in range(200, 300):
        run.log({"x": float(step)})
    run.finish(timeout=20_000 * MS)
    assert run.delivered
    _, stored = live_server.store.metrics(run.id)
    assert stored["x"].step == list(range(300))
    assert live_server.store.integrity_check() == "ok"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_an_unreachable_server_never_blocks_or_breaks_training(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trainwire.client")
    run = trainwire.init(project="e2e", url=f"http://127.0.0.1:{unused_port()}")
    for step in range(1000):
        run.log({"loss": float(step)})
    run.finish(timeout=300 * MS)
    run.finish()  # idempotent
    assert not run.delivered
    assert "unreachable" in caplog.text
    assert "1000 rows undelivered" in caplog.text


def test_log_never_raises_into_training(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    run = trainwire.init(project="e2e", url=live_server.url)
    with caplog.at_level(logging.WARNING, logger="trainwire.client"):
        run.log(None)  # type: ignore[arg-type]
        run.log({"ok": 1.0, "text": "high", "list": [1, 2]})
        run.log({"ok": 2.0}, step=10)
        run.log({"ok": 3.0})
        run.log({"ok": 9.0}, step="eleven")  # type: ignore[arg-type]
        run.finish()
    run.log({"ok": 4.0})  # after finish: ignored with one warning
    _, stored = live_server.store.metrics(run.id)
    assert list(stored) == ["ok"]
    assert stored["ok"].step == [0, 10, 11]
    # The caller's mistakes, said plainly: no traceback of ours, no false cause.
    said = [r.getMessage() for r in caplog.records]
    assert "trainwire: log() takes a dict of metrics, not NoneType; call dropped" in said
    assert all(r.exc_info is None for r in caplog.records)
    assert f"trainwire: 2 rows of run {run.id} were dropped (the warnings above say why)" in said


def test_the_context_manager_finishes_or_marks_the_run_crashed(live_server: LiveServer) -> None:
    with trainwire.init(project="e2e", url=live_server.url) as ok:
        ok.log({"x": 1.0})
    with (
        pytest.raises(ZeroDivisionError),
        trainwire.init(project="e2e", url=live_server.url) as bad,
    ):
        bad.log({"x": 1.0})
        1 / 0  # noqa: B018
    statuses = {r.id: r.status for r in live_server.store.list_runs()}
    assert statuses == {ok.id: "finished", bad.id: "crashed"}


def test_a_finish_status_the_server_does_not_know_ends_the_run_crashed(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refused a Finish of another status, at every resend: the run never
    ended, finish() waited out its timeout, and `trainwire sync` met the same refusal."""
    run = trainwire.init(project="e2e", url=live_server.url)
    run.log({"x": 1.0})
    run.finish(timeout=10, status="failed")  # type: ignore[arg-type]
    assert run.delivered
    assert live_server.store.get_run(run.id).status == "crashed"  # type: ignore[union-attr]
    assert "finish(status='failed') is not one of finished, crashed" in caplog.text


def test_module_level_log_follows_the_last_init(live_server: LiveServer) -> None:
    run = trainwire.init(project="e2e", url=live_server.url)
    trainwire.log({"y": 1.0})
    trainwire.finish()
    assert live_server.store.metrics(run.id)[1]["y"].value == [1.0]


def test_module_level_finish_takes_a_status_as_run_finish_does(live_server: LiveServer) -> None:
    """README: trainwire.finish() is "the same" as run.finish(): its status= was a
    TypeError, raised from finish(), which never raises."""
    run = trainwire.init(project="e2e", url=live_server.url)
    trainwire.log({"y": 1.0})
    trainwire.finish(status="crashed")
    assert run.delivered
    assert live_server.store.get_run(run.id).status == "crashed"  # type: ignore[union-attr]


def test_an_empty_trainwire_mode_is_online(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`TRAINWIRE_MODE=$MODE` with MODE unset raised ConfigError from init()."""
    monkeypatch.setenv("TRAINWIRE_MODE", "")
    run = trainwire.init(project="e2e", url=live_server.url)
    run.log({"y": 1.0})
    run.finish()
    assert run.delivered


def test_logged_objects_are_converted_and_released_while_the_server_is_unreachable() -> None:
    """A loss tensor keeps its autograd graph alive until converted: the sender must not
    hold it for the length of a reconnect backoff."""
    import threading

    converted = threading.Event()

    class Probe:
        def item(self) -> float:
            converted.set()
            return 1.0

    run = trainwire.init(project="e2e", url=f"http://127.0.0.1:{unused_port()}")
    for step in range(3):  # the first connection attempts fail meanwhile
        run.log({"x": 0.0}, step=step)
    run.log({"x": Probe()})
    assert converted.wait(5000 * MS)
    run.finish(timeout=100 * MS)
