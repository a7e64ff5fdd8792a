"""The auto-started local server: a real separate process, found again by later runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import trainwire
from trainwire.cli import main
from trainwire.client.local import ensure_local_server, is_trainwire, read_discovery
from trainwire.server.runner import AlreadyServing, serve, stop
from trainwire.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "user-data"
    yield path
    stop(path)


def test_a_local_server_is_started_once_and_reused(data_dir: Path) -> None:
    url = ensure_local_server(data_dir, port=0)
    assert is_trainwire(url)
    assert read_discovery(data_dir) == url
    assert ensure_local_server(data_dir, port=0) == url  # found, not started again
    with pytest.raises(AlreadyServing, match=f"already serves .* at {url}"):
        serve(Settings(port=0, data_dir=data_dir))


def test_init_without_a_url_starts_the_local_server_that_outlives_the_run(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRAINWIRE_URL", raising=False)
    monkeypatch.setenv("TRAINWIRE_DATA", str(data_dir))
    monkeypatch.setenv("TRAINWIRE_PORT", "0")
    with trainwire.init(project="local", name="auto") as run:
        run.log({"loss": 0.5})
    assert run.delivered
    assert run.server_url == read_discovery(data_dir)
    assert is_trainwire(run.server_url)
    second = trainwire.init(project="local", name="again")
    second.finish()
    assert second.server_url == run.server_url


def test_trainwire_stop_stops_the_server_of_a_data_directory(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ensure_local_server(data_dir, port=0)
    assert main(["stop", "--data", str(data_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"stopped the trainwire server at {url}"
    assert not is_trainwire(url, timeout=1.0)
    assert read_discovery(data_dir) is None
    assert main(["stop", "--data", str(data_dir)]) == 0
    assert capsys.readouterr().out.strip() == "no trainwire server running"
