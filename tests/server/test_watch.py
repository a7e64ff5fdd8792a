from __future__ import annotations

from trainwire.server.watch import RunWatch


def test_a_run_with_a_live_connection_is_never_overdue() -> None:
    watch = RunWatch(timeout=10, now=0)
    watch.connected("r")
    assert watch.overdue(["r"], now=1000) == []


def test_a_run_is_overdue_once_its_last_connection_is_gone_for_the_timeout() -> None:
    watch = RunWatch(timeout=10, now=0)
    watch.connected("r")
    watch.connected("r")
    watch.disconnected("r", now=100)
    assert watch.overdue(["r"], now=200) == []  # one connection is still open
    watch.disconnected("r", now=100)
    assert watch.overdue(["r"], now=109) == []
    assert watch.overdue(["r"], now=111) == ["r"]


def test_runs_found_running_at_startup_get_the_timeout_to_come_back() -> None:
    watch = RunWatch(timeout=10, now=50)
    assert watch.overdue(["old"], now=59) == []
    assert watch.overdue(["old"], now=61) == ["old"]
    watch.forget("old")
