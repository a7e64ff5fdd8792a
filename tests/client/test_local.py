"""The auto-started local server: a real separate process, found again by later runs."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.conftest import MS

import trainwire
from trainwire.cli import main
from trainwire.client import local as local_module
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


def test_a_server_another_process_started_a_moment_before_is_joined_not_claimed(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ranks of a job starting at once each said "started a server", while one
    had and the rest had found it."""
    caplog.set_level(logging.INFO, logger="trainwire.client")
    url = ensure_local_server(data_dir, port=0)
    assert caplog.text.count("started a server") == 1
    # A rank that looked for server.json before the first server wrote it.
    monkeypatch.setattr(local_module, "read_discovery", lambda data_dir: None)
    assert ensure_local_server(data_dir, port=0) == url
    assert caplog.text.count("started a server") == 1
    assert f"using the server at {url}" in caplog.text


def test_the_local_server_is_found_past_a_proxy_set_for_the_internet(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters set http_proxy, often without no_proxy: the health check went to the
    proxy, the server on this machine looked absent, and every init() started
    another."""
    url = ensure_local_server(data_dir, port=0)
    with socket.socket() as proxy:  # listens, never answers: a proxy that cannot help
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        for variable in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's, built once
        assert is_trainwire(url, timeout=2.0)
    with socket.socket() as not_http:  # a port held by something that speaks no HTTP
        not_http.bind(("127.0.0.1", 0))
        not_http.listen()
        assert not is_trainwire(f"http://127.0.0.1:{not_http.getsockname()[1]}", timeout=0.2)


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


@pytest.mark.parametrize("port", ["http", "70000"])
def test_init_with_a_bad_trainwire_port_says_so_as_a_config_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    """The README: bad configuration raises a TrainwireError, not a bare ValueError
    from deep inside (nor a server started on a port that is none)."""
    monkeypatch.delenv("TRAINWIRE_URL", raising=False)
    monkeypatch.setenv("TRAINWIRE_DATA", str(data_dir))
    monkeypatch.setenv("TRAINWIRE_PORT", port)
    with pytest.raises(trainwire.ConfigError, match="TRAINWIRE_PORT must be a port number"):
        trainwire.init(project="local")
    assert read_discovery(data_dir) is None


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


VICTIM_TOKEN = "the-users-own-admin-token"


def test_a_stale_server_json_never_sends_the_admin_token_to_whoever_holds_the_port_now(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reboot (or a server killed with SIGKILL) server.json still names the old
    port. Another user of the machine may listen there now, answering as trainwire
    does: the token in the data directory must not be handed to that process."""
    seen: list[str] = []

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="trainwire"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        data_dir.mkdir(mode=0o700, parents=True)
        (data_dir / "token").write_text(VICTIM_TOKEN + "\n")
        # What a server killed before it could clean up leaves behind; no server holds
        # the data directory's lock now.
        port = impostor.server_address[1]
        stale = {"url": f"http://127.0.0.1:{port}", "pid": 999_999, "version": "0.1.0"}
        (data_dir / "server.json").write_text(json.dumps(stale))
        monkeypatch.delenv("TRAINWIRE_TOKEN")
        monkeypatch.setenv("TRAINWIRE_DATA", str(data_dir))
        monkeypatch.setenv("TRAINWIRE_PORT", "0")
        run = trainwire.init(project="local", name="after-reboot")
        run.log({"loss": 0.5})
        run.finish(timeout=3_000 * MS)
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert not [header for header in seen if VICTIM_TOKEN in header], seen
    assert run.delivered  # to the user's own server, started afresh
