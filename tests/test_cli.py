from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import trainwire as trainwire_api
from trainwire import __version__
from trainwire.cli import main
from trainwire.protocol.messages import RunSpec
from trainwire.server.runner import stop
from trainwire.settings import Settings
from trainwire.storage import SQLiteStore


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trainwire {__version__}"


def test_serve_on_a_taken_port_fails_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainwire",
                "serve",
                "--port",
                str(port),
                "--data",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"trainwire: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainwire", "--help"], capture_output=True, text=True, check=True
    )
    assert "serve" in result.stdout and "demo" in result.stdout


def trainwire(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainwire", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_clear_error(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr, result.stderr


@pytest.mark.parametrize("host", ["", None])
def test_an_empty_or_unset_trainwire_host_binds_loopback(host: str | None) -> None:
    """TRAINWIRE_HOST set but empty bound every interface ("" to bind()), while the
    link printed said 127.0.0.1."""
    env = {} if host is None else {"TRAINWIRE_HOST": host}
    assert Settings.from_env(env).host == "127.0.0.1"
    assert Settings.from_env({"TRAINWIRE_HOST": "0.0.0.0"}).host == "0.0.0.0"


def test_every_trainwire_variable_set_but_empty_is_unset() -> None:
    """README: a variable set but empty counts as unset. TRAINWIRE_PORT= and
    TRAINWIRE_HEARTBEAT_TIMEOUT= were errors that stopped every command."""
    empty = {
        name: ""
        for name in (
            "TRAINWIRE_HOST",
            "TRAINWIRE_PORT",
            "TRAINWIRE_DATA",
            "TRAINWIRE_HEARTBEAT_TIMEOUT",
            "TRAINWIRE_TOKEN",
        )
    }
    assert Settings.from_env(empty) == Settings.from_env({})


def test_a_share_link_names_the_host_other_machines_reach_the_server_by(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server bound to every interface wrote both URLs down; the share link, made
    for a colleague, takes the one that reaches it from elsewhere."""
    data = tmp_path / "data"
    data.mkdir()
    found = {"url": "http://127.0.0.1:8765", "public_url": "http://gpu-7.lab:8765", "pid": 1}
    (data / "server.json").write_text(json.dumps(found))
    assert main(["token", "--data", str(data), "create"]) == 0
    assert "share link: http://gpu-7.lab:8765/?token=" in capsys.readouterr().out


def test_a_token_that_would_be_born_expired_is_refused(tmp_path: Path) -> None:
    result = trainwire("token", "--data", str(tmp_path), "create", "--expires", "0s")
    assert_clear_error(result, "a duration must be more than 0, not '0s'")


def test_tokens_of_a_data_directory_no_server_used_say_so(tmp_path: Path) -> None:
    """A mistyped --data listed nothing, as if the server had no share tokens."""
    result = trainwire("token", "--data", str(tmp_path / "typo"), "list")
    assert result.returncode == 0 and result.stdout == ""
    assert f"no trainwire data in {tmp_path / 'typo'} yet; is --data right?" in result.stderr
    assert trainwire("token", "--data", str(tmp_path / "typo"), "list").stderr == ""


def test_a_bad_trainwire_port_variable_is_one_clear_line(tmp_path: Path) -> None:
    result = trainwire("token", "--data", str(tmp_path), "list", env={"TRAINWIRE_PORT": "http"})
    assert_clear_error(result, "TRAINWIRE_PORT must be a port number")


def test_syncing_a_file_that_is_not_there_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "run.twrun"
    result = trainwire("sync", str(missing), "--url", "http://127.0.0.1:9")
    assert_clear_error(result, str(missing))


def test_syncing_a_path_that_is_not_there_starts_no_server(tmp_path: Path) -> None:
    """Without --url, sync starts the local server: not for a mistyped path."""
    data = tmp_path / "data"
    missing = tmp_path / "runs"
    try:
        result = trainwire("sync", str(missing), env={"TRAINWIRE_DATA": str(data)})
        assert_clear_error(result, str(missing))
        assert not (data / "server.json").exists()
    finally:
        stop(data)  # one started all the same


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "soon"])
def test_a_sync_timeout_that_is_no_duration_is_one_clear_line(timeout: str) -> None:
    """NaN and inf reached Thread.join: a traceback, once the upload had begun."""
    with trainwire_api.init(mode="offline") as run:
        run.log({"loss": 1.0})
    result = trainwire("sync", str(run.path), "--url", "http://127.0.0.1:9", "--timeout", timeout)
    assert_clear_error(result, "--timeout")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_clear_line(tmp_path: Path, port: str) -> None:
    result = trainwire("serve", "--port", port, "--data", str(tmp_path))
    assert_clear_error(result, port)


def test_a_missing_certificate_is_one_clear_line(tmp_path: Path) -> None:
    result = trainwire(
        "serve",
        "--port",
        "0",
        "--data",
        str(tmp_path / "data"),
        "--certfile",
        str(tmp_path / "cert.pem"),
        "--keyfile",
        str(tmp_path / "key.pem"),
    )
    assert_clear_error(result, "cert.pem")


def test_a_heartbeat_timeout_of_zero_or_less_is_refused(tmp_path: Path) -> None:
    """0 would mark every run crashed the moment its trainer blinked, and spin the
    reaper (asyncio.sleep(0) in a loop) at full CPU."""
    try:
        result = trainwire(
            "serve", "--port", "0", "--data", str(tmp_path), "--heartbeat-timeout", "0", timeout=10
        )
    except subprocess.TimeoutExpired:
        pytest.fail("trainwire serve --heartbeat-timeout 0 started serving")
    assert_clear_error(result, "heartbeat")


def test_the_data_directory_the_cli_makes_is_private(tmp_path: Path) -> None:
    """README: the data directory is 0700 (it holds every run, and the token)."""
    made_by_token = tmp_path / "by-token"
    assert trainwire("token", "--data", str(made_by_token), "list").returncode == 0
    made_by_serve = tmp_path / "by-serve"
    with socket.socket() as taken:  # serve makes its directory, then fails to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        trainwire("serve", "--port", port, "--data", str(made_by_serve))
    for made in (made_by_token, made_by_serve):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made


def test_run_files_and_the_database_are_private_whoever_made_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the data directory is 0700. One first made by a client (an offline run,
    a spill file) was 0755, its run files 0644, and the server's database made in it
    later 0644: every user of the machine could read every run."""
    data = tmp_path / "new" / "data"
    monkeypatch.setenv("TRAINWIRE_DATA", str(data))
    with trainwire_api.init(mode="offline") as run:
        run.log({"loss": 1.0})
    for made in (tmp_path / "new", data, data / "runs", run.path.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o600
    # A folder the user made, open to others: what trainwire writes in it is not.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    store = SQLiteStore(shared / "trainwire.db")
    try:
        store.open_run(RunSpec(id="r", project="p", name="n"), "s", 0.0)
        for name in ("trainwire.db", "trainwire.db-wal", "trainwire.db-shm"):
            assert stat.S_IMODE((shared / name).stat().st_mode) == 0o600, name
    finally:
        store.close()
