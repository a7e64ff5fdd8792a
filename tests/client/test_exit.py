"""Runs left open, finished when the interpreter exits."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import MS, LiveServer, wait_until

import trainwire
from trainwire.client import run as run_module
from trainwire.client.spool import SpillingOutbox
from trainwire.protocol.messages import Batch, Finish

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


def waiting_at_exit(script: str) -> tuple[subprocess.Popen[str], Path]:
    """``script``, run with its server away, once it ended and its exit waits to
    deliver the run it left open (it prints the run's path first)."""
    env = {
        **os.environ,
        "TRAINWIRE_URL": UNREACHABLE,
        "TRAINWIRE_SYSTEM_METRICS": "0",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    trainer = subprocess.Popen(
        [sys.executable, "-c", script],
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
    return trainer, path


def saved_steps(path: Path) -> tuple[list[int], object]:
    """The steps of the rows in the run file at ``path``, and its last item."""
    outbox = SpillingOutbox.open_existing(path)
    try:
        items = outbox.items(1, 10)
    finally:
        outbox.close()
    steps = [row[0] for item in items if isinstance(item, Batch) for row in item.rows]
    return steps, items[-1]


def test_ctrl_c_during_the_exit_wait_saves_the_rows_and_exits_at_once() -> None:
    trainer, path = waiting_at_exit(SCRIPT)
    trainer.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    _, rest = trainer.communicate(timeout=30)
    assert time.monotonic() - interrupted < 10  # not the rest of the 30 s
    assert "Traceback" not in rest, rest
    assert path.exists()


SCRIPT_100 = """
import trainwire
run = trainwire.init(id="left-open-term")
for step in range(100):
    run.log({"x": float(step)}, step=step)
print(run.path, flush=True)
"""


def test_sigterm_during_the_exit_wait_saves_the_rows_then_ends_the_process() -> None:
    """Jupyter's kernel restart or shutdown sends SIGTERM 2.5 s after asking the
    kernel to exit (docker stop after 10 s): it ended the process at once, in the
    exit's 30 s wait on a server away, and every row the sender held in memory was
    lost, no run file written."""
    trainer, path = waiting_at_exit(SCRIPT_100)
    trainer.terminate()
    terminated = time.monotonic()
    _, rest = trainer.communicate(timeout=30)
    assert time.monotonic() - terminated < 10  # not the rest of the 30 s
    assert trainer.returncode == -signal.SIGTERM  # then ended by it, as it would have been
    assert "Traceback" not in rest, rest
    steps, last = saved_steps(path)
    assert steps == list(range(100))
    assert isinstance(last, Finish)


def test_ctrl_c_during_finish_saves_the_rows_before_it_stops_the_script() -> None:
    """Ctrl-C on a finish() waiting on a server away (the `with` block's too) went
    straight through: the run was no longer open, so the exit saved nothing, and the
    daemon sender died with the script and every row it held in memory."""
    run = trainwire.init(url=UNREACHABLE)
    for step in range(100):
        run.log({"x": float(step)}, step=step)
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:  # once finish() has told the sender and waits for it
        if wait_until(run._sender._closing.is_set, 5000 * MS):
            signal.pthread_kill(main, signal.SIGINT)

    # A test runner may run with SIGINT ignored; a terminal's script does not.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run.finish(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 10  # not the rest of the 30 s
    assert run._sender.ended.is_set()
    steps, last = saved_steps(run.path)
    assert steps == list(range(100))
    assert isinstance(last, Finish)


def _train_left_open(url: str, run_id: str, ending: str) -> None:
    run = trainwire.init(url=url, id=run_id, flush_interval=60.0)  # nothing sent before the end
    for step in range(100):
        run.log({"x": float(step)}, step=step)
    if ending == "raise":
        raise RuntimeError("CUDA out of memory (a stand-in)")
    if ending == "exit 3":
        sys.exit(3)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.parametrize(
    ("method", "ending", "exitcode", "status"),
    [
        ("fork", "return", 0, "finished"),
        ("forkserver", "return", 0, "finished"),
        ("fork", "raise", 1, "crashed"),
        ("fork", "exit 3", 3, "crashed"),
    ],
)
def test_a_run_left_open_in_a_multiprocessing_child_is_finished_as_it_exits(
    live_server: LiveServer, method: str, ending: str, exitcode: int, status: str
) -> None:
    """A multiprocessing child ends with os._exit, which runs no atexit hook: a run
    a sweep's worker left open lost the rows of its last flush and its end. A
    target that raises (multiprocessing prints it; excepthook never sees it) or
    exits non-zero ends it crashed."""
    run_id = f"worker-{method}-{ending.replace(' ', '-')}"
    child = multiprocessing.get_context(method).Process(
        target=_train_left_open, args=(live_server.url, run_id, ending)
    )
    child.start()
    child.join(30_000 * MS)
    assert child.exitcode == exitcode
    run = live_server.store.get_run(run_id)
    assert run is not None and run.status == status
    assert live_server.store.metrics(run_id)[1]["x"].step == list(range(100))


def test_a_new_init_in_a_notebook_finishes_the_run_of_the_previous_one(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running a notebook's init cell left the first run "running" until the
    kernel exited, with nothing left to finish it by. A script keeps both."""
    first = trainwire.init(url=live_server.url)
    second = trainwire.init(url=live_server.url)  # a script: both stay open
    assert first._sender.is_alive() and second._sender.is_alive()
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # as ipykernel and the REPL set
    third = trainwire.init(url=live_server.url)
    assert second.state.value == "finished"
    assert live_server.store.get_run(second.id).status == "finished"  # type: ignore[union-attr]
    assert first._sender.is_alive()  # not the last init()'s: the user still holds it
    for run in (first, third):
        run.finish()
