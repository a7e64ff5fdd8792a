"""Runs left open, finished when the interpreter exits."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainwire
from trainwire.client import run as run_module

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once


def test_runs_left_open_are_finished_side_by_side_within_one_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One after the other, each run of a sweep left open waited out the whole
    timeout with the server away: 30 s of a silent exit per run."""
    runs = [trainwire.init(url=UNREACHABLE, id=f"open-{i}") for i in range(3)]
    for run in runs:
        run.log({"x": 1.0})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainwire.client"):
        run_module._finish_at_exit.finish_open_runs(timeout=2.0)
    assert time.monotonic() - started < 4.5  # not 3 x 2 s
    assert all(run.state is run_module.RunState.FINISHED for run in runs)
    assert all(run.path.exists() for run in runs)  # the rows, kept for trainwire sync
    # Said before the wait, not only after it.
    assert any("left open at exit" in r.getMessage() for r in caplog.records)


SCRIPT = """
import sys, trainwire
run = trainwire.init(id="left-open")
run.log({"x": 1.0})
print(run.path, flush=True)
"""


def test_ctrl_c_during_the_exit_wait_saves_the_rows_and_exits_at_once(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TRAINWIRE_URL": UNREACHABLE,
        "TRAINWIRE_SYSTEM_METRICS": "0",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    trainer = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test runner may run with SIGINT ignored; a terminal's script does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert trainer.stdout is not None and trainer.stderr is not None
    path = Path(trainer.stdout.readline().strip())
    for line in trainer.stderr:  # the script ended; its finish at exit says it waits
        if "left open at exit" in line:
            break
    assert trainer.poll() is None
    trainer.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    _, rest = trainer.communicate(timeout=30)
    assert time.monotonic() - interrupted < 10  # not the rest of the 30 s
    assert "Traceback" not in rest, rest
    assert path.exists()
