from __future__ import annotations

import math

from fastapi.testclient import TestClient

from tests.server.conftest import SPEC, open_trainer, receive, send
from trainwire import __version__
from trainwire.protocol.messages import Batch


def test_health_names_the_app_so_clients_can_tell_it_from_other_servers(client: TestClient) -> None:
    assert client.get("/api/health").json() == {
        "app": "trainwire",
        "version": __version__,
        "protocol": 1,
    }


def test_runs_run_and_metrics_routes(client: TestClient) -> None:
    with open_trainer(client) as trainer:
        rows = [(0, 5.0, {"a": 1.0, "b": math.inf}), (1, 6.0, {"a": -math.inf, "b": math.nan})]
        send(trainer, Batch(seq=1, rows=rows))
        receive(trainer)
    [run] = client.get("/api/runs").json()
    assert {k: run[k] for k in ("id", "project", "name", "status", "config")} == {
        "id": "run-1",
        "project": "digits",
        "name": "cnn",
        "status": "running",
        "config": SPEC.config,
    }
    assert isinstance(run["created"], float)
    assert client.get("/api/runs/run-1").json()["keys"] == ["a", "b"]
    metrics = client.get("/api/runs/run-1/metrics", params={"keys": "b"}).json()
    assert metrics == {"b": {"step": [0, 1], "time": [5.0, 6.0], "value": ["Infinity", "NaN"]}}
    assert client.get("/api/runs/run-1/metrics").json()["a"]["value"] == [1.0, "-Infinity"]


def test_unknown_runs_are_404_with_a_reason(client: TestClient) -> None:
    for path in ("/api/runs/ghost", "/api/runs/ghost/metrics"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "no run 'ghost'"}


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/health",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/metrics",
    }


def test_the_dashboard_ships_inside_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'type="module"' in page.text
    assert "https://" not in page.text and "http://" not in page.text
    script = client.get("/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    uplot = client.get("/vendor/uplot/uPlot.esm.js")
    assert uplot.status_code == 200 and "uPlot" in uplot.text
    assert client.get("/vendor/uplot/LICENSE").status_code == 200
