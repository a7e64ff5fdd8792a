from __future__ import annotations

import json
import math
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import trainwire
from tests.conftest import MS, TOKEN, LiveServer
from tests.server.conftest import ADMIN_TOKEN, SPEC, app_settings, open_trainer, receive, send
from tests.server.test_dashboard import greeting, log_batch, open_dashboard, steps
from trainwire import __version__
from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunSpec
from trainwire.server.app import create_app
from trainwire.storage import SampledSeries, SQLiteStore


def test_health_names_the_app_so_clients_can_tell_it_from_other_servers(client: TestClient) -> None:
    assert client.get("/api/health").json() == {
        "app": "trainwire",
        "version": __version__,
        "protocol": 1,
    }


class StoreThatCannotRead(SQLiteStore):
    def runs_json(self) -> bytes:
        raise StorageError("database is locked")


def test_a_read_the_store_fails_is_503_with_the_reason(tmp_path: Path) -> None:
    """Not a 500 and a traceback: 503 says "try again", which the dashboard does."""
    app = create_app(app_settings(tmp_path), store=StoreThatCannotRead(tmp_path / "t.db"))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        answer = client.get("/api/runs")
        assert answer.status_code == 503
        assert answer.json() == {"detail": "storage error: database is locked"}
        assert client.get("/api/health").status_code == 200


def test_runs_run_and_metrics_routes(client: TestClient) -> None:
    with open_trainer(client) as trainer:
        rows = [(0, 5.0, {"a": 1.0, "b": math.inf}), (1, 6.0, {"a": -math.inf, "b": math.nan})]
        send(trainer, Batch(seq=1, rows=rows))
        receive(trainer)
    [run] = client.get("/api/runs").json()
    assert {k: run[k] for k in ("id", "project", "name", "status", "config", "env")} == {
        "id": "run-1",
        "project": "digits",
        "name": "cnn",
        "status": "running",
        "config": SPEC.config,
        "env": {},  # this trainer, like an older client, said nothing about it
    }
    assert isinstance(run["created"], float)
    assert client.get("/api/runs/run-1").json()["keys"] == ["a", "b"]
    metrics = client.get("/api/runs/run-1/metrics", params={"keys": "b"}).json()
    assert metrics == {
        "run": "run-1",
        "seq": 1,
        "series": {
            "b": {
                "step": [0, 1],
                "time": [5.0, 6.0],
                "value": ["Infinity", "NaN"],
                "sampled": False,
            }
        },
    }
    everything = client.get("/api/runs/run-1/metrics").json()["series"]
    assert list(everything) == ["a", "b"] and everything["a"]["value"] == [1.0, "-Infinity"]


def test_a_run_comes_with_a_summary_of_each_metric(client: TestClient) -> None:
    with open_trainer(client) as trainer:
        log = [(3, {"loss": 2.0, "acc": math.nan}), (1, {"loss": 9.0}), (2, {"loss": -math.inf})]
        for seq, (step, values) in enumerate(log, start=1):
            send(trainer, Batch(seq=seq, rows=[(step, 1.0, values)]))
            receive(trainer)
    run = client.get("/api/runs/run-1").json()
    assert run["summary"] == {
        # Last as logged, not the highest step; min and max of finite values only.
        "loss": {"count": 3, "last": "-Infinity", "last_step": 2, "min": 2.0, "max": 9.0},
        "acc": {"count": 1, "last": "NaN", "last_step": 3, "min": None, "max": None},
    }
    assert run["env"] == {}


def test_metrics_are_sorted_by_step_limited_to_a_range_and_downsampled_on_request(
    client: TestClient,
) -> None:
    # Steps logged out of order, as a resumed run does; 5 logged twice.
    logged = [*range(0, 10), 5, *range(10, 100)]
    with open_trainer(client) as trainer:
        rows = [(step, float(i), {"x": float(i % 7)}) for i, step in enumerate(logged)]
        rows[50] = (rows[50][0], rows[50][1], {"x": 1000.0})  # a spike
        send(trainer, Batch(seq=1, rows=rows[:60]))
        receive(trainer)
        send(trainer, Batch(seq=2, rows=rows[60:]))
        receive(trainer)
    raw = client.get("/api/runs/run-1/metrics").json()["series"]["x"]
    assert raw["step"] == sorted(logged) and raw["sampled"] is False
    assert raw["time"][5:7] == [5.0, 10.0]  # equal steps stay in logging order

    part = client.get("/api/runs/run-1/metrics", params={"start": 40, "end": 59}).json()
    assert part["series"]["x"]["step"] == list(range(40, 60))

    few = client.get("/api/runs/run-1/metrics", params={"points": 10}).json()["series"]["x"]
    assert few["sampled"] is True and len(few["step"]) <= 10
    assert few["step"] == sorted(few["step"]) and 1000.0 in few["value"]

    # Asking for more points than there are gives them all, unsampled.
    many = client.get("/api/runs/run-1/metrics", params={"points": 1000}).json()["series"]["x"]
    assert many == raw


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("points=1", "points", "greater than or equal to 2"),
        ("points=100001", "points", "less than or equal to 100000"),
        ("points=many", "points", "valid integer"),
        ("start=one", "start", "valid integer"),
        ("end=9223372036854775808", "end", "less than or equal to"),
        ("start=10&end=9", "end", "end (9) must not be less than start (10)"),
    ],
)
def test_bad_metrics_queries_are_422_with_the_reason(
    client: TestClient, query: str, field: str, message: str
) -> None:
    with open_trainer(client) as trainer:
        send(trainer, Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})]))
        receive(trainer)
    response = client.get(f"/api/runs/run-1/metrics?{query}")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field] and message in error["msg"], error


def test_the_seq_of_a_read_is_where_a_dashboard_subscribes_with_no_gap_or_duplicate(
    client: TestClient,
) -> None:
    with open_trainer(client) as trainer:
        log_batch(trainer, 1, 0, 1)
        log_batch(trainer, 2, 2)
        history = client.get("/api/runs/run-1/metrics").json()
        assert history["seq"] == 2
        # Points committed between the read and the subscription.
        log_batch(trainer, 3, 3)
        with open_dashboard(client) as dash:
            greeting(dash)
            dash.send_json({"type": "subscribe", "run": "run-1", "after": history["seq"]})
            missed = dash.receive_json()
            assert (missed["seq"], steps(missed)) == (3, [3])
            log_batch(trainer, 4, 4)
            live = dash.receive_json()
            assert (live["seq"], steps(live)) == (4, [4])
    seen = history["series"]["train/loss"]["step"] + steps(missed) + steps(live)
    assert seen == [0, 1, 2, 3, 4]


def test_a_metric_downloads_as_csv_sorted_by_step_with_a_safe_file_name(
    client: TestClient,
) -> None:
    spec = RunSpec(id="run-1", project="p", name='lr=3e-3 "best"/..')
    with open_trainer(client, spec) as trainer:
        rows = [(2, 12.5, {"train/loss": math.nan}), (0, 10.0, {"train/loss": 0.25})]
        send(trainer, Batch(seq=1, rows=rows))
        receive(trainer)
        send(trainer, Batch(seq=2, rows=[(1, 11.0, {"train/loss": -math.inf})]))
        receive(trainer)
    response = client.get("/api/runs/run-1/csv", params={"key": "train/loss"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        'attachment; filename="lr_3e-3__best__-train_loss.csv"'
    )
    assert response.text.splitlines() == [
        "step,time,value",
        "0,10.0,0.25",
        "1,11.0,-Infinity",
        "2,12.5,NaN",
    ]


def test_every_point_of_a_csv_reads_back_as_the_float_stored(client: TestClient) -> None:
    """Numbers are spelled as the JSON API spells them (shortest round trip), a block
    of lines at a time: across blocks, and at the far ends of floats and steps."""
    extremes = [5e-324, -0.0, 1e-5, 0.1, 1e16, -1.7976931348623157e308, 2.5e-7, math.inf]
    steps = [*range(25_000), 2**62]
    rows = [
        (s, 1.7e9 + i / 100, {"v": extremes[i % len(extremes)] if i % 2 else i / 7})
        for i, s in enumerate(steps)
    ]
    with open_trainer(client) as trainer:
        for seq, first in enumerate(range(0, len(rows), 1_000), start=1):
            send(trainer, Batch(seq=seq, rows=rows[first : first + 1_000]))
            receive(trainer)
    response = client.get("/api/runs/run-1/csv", params={"key": "v"})
    header, *lines = response.text.splitlines()
    assert header == "step,time,value" and len(lines) == len(rows)
    for (step, at, values), line in zip(rows, lines, strict=True):
        text_step, text_at, text_value = line.split(",")
        assert (int(text_step), float(text_at)) == (step, at)
        assert float(text_value) == values["v"]  # float() reads "Infinity" too
        assert math.copysign(1, float(text_value)) == math.copysign(1, values["v"])
    assert lines[15].endswith(",Infinity") and lines[1].endswith(",-0.0")


def test_a_delete_whose_points_cannot_go_yet_is_still_a_delete(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run was gone, and dashboards told, when deleting its points failed (a
    full disk): the answer was a 503, and the admin's retry a 404."""
    with open_trainer(client) as trainer:
        send(trainer, Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})]))
        receive(trainer)
    with sqlite3.connect(tmp_path / "trainwire.db") as db:
        db.execute(
            "CREATE TRIGGER full BEFORE DELETE ON chunks"
            " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
        )
    with open_dashboard(client) as dash:
        greeting(dash)
        assert client.delete(f"/api/runs/{SPEC.id}").status_code == 204
        told = dash.receive_json()
        assert (told["type"], told["run"]["id"], told["run"]["status"]) == (
            "run",
            SPEC.id,
            "deleted",
        )
    assert "its points are left for later (database or disk is full)" in caplog.text
    assert client.get(f"/api/runs/{SPEC.id}").status_code == 404
    assert client.get("/api/runs").json() == []


def test_unknown_runs_and_keys_are_404_with_a_reason(client: TestClient) -> None:
    for path in ("/api/runs/ghost", "/api/runs/ghost/metrics", "/api/runs/ghost/csv?key=x"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "no run 'ghost'"}
    with open_trainer(client) as trainer:
        send(trainer, Batch(seq=1, rows=[(0, 1.0, {"x": 1.0})]))
        receive(trainer)
    response = client.get("/api/runs/run-1/csv", params={"key": "y"})
    assert response.status_code == 404
    assert response.json() == {"detail": "no metric 'y' in run 'run-1'"}
    assert client.get("/api/runs/run-1/csv").status_code == 422  # which key?


def test_commits_refresh_the_run_lists_of_open_dashboards(tmp_path: Path) -> None:
    """With no interval, every commit re-sends its run: ``updated`` moves on each."""
    app = create_app(app_settings(tmp_path, run_update_interval=0.0))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        with open_trainer(client) as trainer, open_dashboard(client) as dash:
            [run] = greeting(dash)
            updated = [run["updated"]]
            for seq in (1, 2):
                log_batch(trainer, seq, seq)
                frame = dash.receive_json()
                assert (frame["type"], frame["run"]["id"]) == ("run", "run-1")
                updated.append(frame["run"]["updated"])
            assert updated == sorted(updated) and updated[0] < updated[-1]


def test_the_environment_of_init_reaches_the_run(live_server: LiveServer) -> None:
    run = trainwire.init(project="env", name="probe", url=live_server.url, system_metrics=False)
    run.log({"x": 1.0})
    run.finish(timeout=10_000 * MS)
    assert run.delivered
    request = urllib.request.Request(
        f"{live_server.url}/api/runs/{run.id}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10_000 * MS) as response:
        env: dict[str, Any] = json.load(response)["env"]
    assert env["trainwire"] == __version__ and env["pid"] > 0
    assert env["python"].count(".") == 2 and env["host"] and env["os"]
    assert isinstance(env["argv"], list) and env["argv"]


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/health",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/metrics",
        "/api/runs/{run_id}/csv",
    }
    csv = paths["/api/runs/{run_id}/csv"]["get"]["responses"]["200"]
    assert list(csv["content"]) == ["text/csv"]


def test_the_dashboard_ships_inside_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'type="module"' in page.text
    assert "https://" not in page.text and "http://" not in page.text
    script = client.get("/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    uplot = client.get("/vendor/uplot/uPlot.esm.js")
    assert uplot.status_code == 200 and "uPlot" in uplot.text
    assert client.get("/vendor/uplot/LICENSE").status_code == 200


def test_every_point_of_a_long_run_is_streamed_as_the_same_json(client: TestClient) -> None:
    """Past STREAM_VALUES values the answer comes in blocks (one encode of tens of
    megabytes held the GIL, and every trainer and dashboard, for half a second): the
    same document, NaN and infinities spelled, as the one-piece answer."""
    from trainwire.server import api

    def values(s: int) -> dict[str, float]:
        special = {7: math.nan, 30_001: math.inf, 30_002: -math.inf}
        return {"a": special.get(s, s / 2), "b": float(s)}

    with open_trainer(client) as trainer:
        for seq in range(1, 41):  # 40,000 steps of two keys: 80,000 values
            first = (seq - 1) * 1000
            rows = [(s, s * 0.5, values(s)) for s in range(first, first + 1000)]
            send(trainer, Batch(seq=seq, rows=rows))
            receive(trainer)
    streamed = client.get("/api/runs/run-1/metrics")
    assert streamed.status_code == 200
    assert "content-length" not in streamed.headers  # sent in blocks
    body = json.loads(streamed.content)
    assert body["seq"] == 40 and body["series"]["b"]["step"] == list(range(40_000))
    spelled = body["series"]["a"]["value"]
    assert (spelled[7], spelled[8], spelled[30_001], spelled[30_002]) == (
        "NaN",
        4.0,
        "Infinity",
        "-Infinity",
    )
    assert body["series"]["a"]["sampled"] is False
    whole = client.get("/api/runs/run-1/metrics?keys=a")  # 40,000 values: one piece
    assert "content-length" in whole.headers
    assert json.loads(whole.content)["series"]["a"] == body["series"]["a"]
    assert api.STREAM_VALUES < 80_000 <= 2 * api.STREAM_VALUES


def test_a_streamed_answer_of_many_keys_goes_in_large_blocks() -> None:
    """Each block streamed is a hop to the thread pool and a write to the socket: one
    per key and column made a 400-key run's answer take twice as long. Joined, the
    blocks are the document the one-piece answer is."""
    from trainwire.server import api

    series = {
        f"grad_norm/layer.{k}": SampledSeries(
            list(range(200)), [0.5] * 200, [math.nan if k == 3 else k / 7] * 200, False
        )
        for k in range(400)
    }
    blocks = list(api._streamed_json("r", 9, series))
    assert all(len(block) >= api.STREAM_BYTES for block in blocks[:-1])
    assert len(blocks) < 10  # not one per key and column: 2,000 pieces
    body = json.loads(b"".join(blocks))
    assert body == json.loads(api._json({"run": "r", "seq": 9, "series": series}).body)
    assert body["series"]["grad_norm/layer.3"]["value"][0] == "NaN"
