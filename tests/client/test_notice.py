"""Messages a user must see, whether or not the script configured logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from trainwire.client.notice import notice


def test_without_logging_configured_a_notice_is_one_line_on_stderr() -> None:
    """As in most training scripts: INFO through logging would show nothing there."""
    script = (
        "import logging\n"
        "from trainwire.client.notice import notice\n"
        "notice(logging.getLogger('trainwire.client'), 'trainwire: run %s written', 'r1')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stderr == "trainwire: run r1 written\n"


def test_with_logging_configured_a_notice_goes_through_it(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="trainwire.client"):
        notice(logging.getLogger("trainwire.client"), "trainwire: run %s written", "r1")
    assert [r.getMessage() for r in caplog.records] == ["trainwire: run r1 written"]
    assert capsys.readouterr().err == ""


def test_an_offline_run_says_where_its_file_is_and_how_to_upload_it() -> None:
    script = (
        "import trainwire\n"
        "run = trainwire.init(mode='offline')\n"
        "run.log({'x': 1.0})\n"
        "run.finish()\n"
        "print(run.path)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    path = result.stdout.strip()
    assert f"upload it with: trainwire sync {path}" in result.stderr
