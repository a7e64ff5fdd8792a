from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainwire import __version__
from trainwire.cli import main


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
