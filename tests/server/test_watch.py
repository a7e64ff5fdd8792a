from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import RunInfo, RunSpec
from trainwire.server.app import reap_crashed_runs
from trainwire.server.bus import BusEvent, MemoryBus, RunChanged
from trainwire.server.watch import RunWatch
from trainwire.storage import SQLiteStore, Store

SPEC = RunSpec(id="r1", project="p", name="n")


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


async def first_announcement(store: Store, watch: RunWatch) -> RunInfo:
    """Run the reaper until it announces a run to the dashboards: that run."""
    bus = MemoryBus()
    announced: asyncio.Future[RunInfo] = asyncio.get_running_loop().create_future()

    def on_event(event: BusEvent) -> None:
        if isinstance(event, RunChanged) and not announced.done():
            announced.set_result(event.run)

    bus.subscribe(on_event)
    reaper = asyncio.create_task(reap_crashed_runs(store, bus, watch))
    waiting: set[asyncio.Future[Any]] = {reaper, announced}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if reaper.done():
        reaper.result()  # raises what ended it
    reaper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reaper
    return announced.result()


class FailsOnce(SQLiteStore):
    """The real store, whose first look for running runs meets a transient error, as
    SQLite's ``database is locked`` (another process writing the file for longer than
    the 5 s busy timeout) or a full disk would give."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failed = False

    def running_runs(self) -> list[str]:
        if not self.failed:
            self.failed = True
            raise StorageError("database is locked")
        return super().running_runs()


# FailsOnce: the reaper is one task for the server's whole life; a single failed read
# must not leave every later vanished trainer's run "running" forever.
@pytest.mark.parametrize("store_class", [SQLiteStore, FailsOnce])
def test_the_reaper_marks_crashed_a_run_whose_trainers_are_gone(
    tmp_path: Path, store_class: type[SQLiteStore]
) -> None:
    store = store_class(tmp_path / "t.db")
    store.open_run(SPEC, "gone", now=1.0)
    watch = RunWatch(timeout=0.0, now=0.0)
    announced = asyncio.run(first_announcement(store, watch))
    assert announced.status == "crashed"
    assert store.running_runs() == []
    store.close()


class HelloDuringTheReap(SQLiteStore):
    """The real store, where a trainer's hello, as ingest makes it (counted connected,
    then its stream opened), lands while the reaper's mark_crashed is in its thread."""

    def __init__(self, path: Path, watch: RunWatch, stream: str) -> None:
        super().__init__(path)
        self.watch = watch
        self.stream = stream

    def mark_crashed(self, run_id: str, now: float) -> RunInfo | None:
        self.watch.connected(run_id)
        self.open_run(SPEC, self.stream, now)
        return super().mark_crashed(run_id, now)


@pytest.mark.parametrize("stream", ["vanished", "another"])
def test_a_trainer_that_says_hello_as_the_reaper_writes_keeps_its_run_running(
    tmp_path: Path, stream: str
) -> None:
    # Back on the stream that vanished (the same process, reconnected), or on another.
    watch = RunWatch(timeout=0.0, now=0.0)
    store = HelloDuringTheReap(tmp_path / "t.db", watch, stream)
    store.open_run(SPEC, "vanished", now=1.0)
    announced = asyncio.run(first_announcement(store, watch))
    # A trainer is connected and streaming: neither storage nor dashboards say crashed.
    assert announced.status == "running"
    assert store.running_runs() == ["r1"]
    store.close()


def test_the_streams_with_a_writer_connected_are_known() -> None:
    watch = RunWatch(timeout=60, now=0)
    watch.connected("r", "a")
    watch.connected("r", "b")
    watch.connected("r", "b")
    watch.disconnected("r", now=1, stream="b")
    assert watch.streams("r") == {"a", "b"}
    watch.disconnected("r", now=1, stream="b")
    watch.disconnected("r", now=2, stream="a")
    assert watch.streams("r") == set()
    assert watch.overdue(["r"], now=63) == ["r"]
