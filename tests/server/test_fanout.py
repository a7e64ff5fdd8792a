"""DashboardFeed on its own: fake storage, a recording socket, no server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from trainwire.exceptions import ProtocolError
from trainwire.protocol.columns import series_from_rows
from trainwire.protocol.messages import Points, RunInfo, Subscribe, Unsubscribe, encode_json
from trainwire.server import fanout
from trainwire.server.bus import PointsCommitted, RunChanged
from trainwire.server.fanout import DashboardFeed, Followers
from trainwire.storage.base import CommittedColumns


class History:
    """Stands in for storage: batch seq -> steps, each step one point of key "x"."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}

    def commit(self, seq: int, *steps: int) -> PointsCommitted:
        prev = max(self.batches, default=0)
        self.batches[seq] = list(steps)
        rows = [(s, 0.0, {"x": float(s)}) for s in steps]
        frame = encode_json(Points(run="r", seq=seq, series=series_from_rows(rows)))
        return PointsCommitted("r", prev, seq, frame)

    async def read(self, run_id: str, after: int) -> tuple[int, dict[str, CommittedColumns]]:
        points = [(q, s) for q, ss in self.batches.items() if q > after for s in ss]
        columns = {}
        if points:
            commits = np.array([q for q, _ in points], dtype=np.int64)
            steps = np.array([s for _, s in points], dtype=np.int64)
            values = steps.astype(np.float64)
            columns["x"] = CommittedColumns(steps, np.zeros(len(steps)), values, commits)
        return max(self.batches, default=0), columns


class Browser:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: bytes) -> None:
        self.frames.append(json.loads(frame))

    def steps(self) -> list[int]:
        return [
            s
            for f in self.frames
            if f["type"] == "points"
            for s in f["series"].get("x", {}).get("step", [])
        ]


def test_a_dashboard_that_falls_behind_is_caught_up_from_storage_losing_nothing() -> None:
    async def scenario() -> None:
        history, browser = History(), Browser()
        feed = DashboardFeed(history.read, browser.send, max_queued=3)
        feed.command(Subscribe("r", 0))
        await feed.pump()
        # The browser reads nothing while ten batches arrive: the queue overflows.
        for seq in range(1, 11):
            feed.on_event(history.commit(seq, seq * 10))
        assert feed.overflows >= 1
        await feed.pump()
        assert browser.steps() == [seq * 10 for seq in range(1, 11)]
        feed.on_event(history.commit(11, 110))
        await feed.pump()
        assert browser.steps()[-1] == 110 and len(browser.steps()) == 11

    asyncio.run(scenario())


def test_live_events_already_covered_by_the_snapshot_are_not_sent_twice() -> None:
    async def scenario() -> None:
        history, browser = History(), Browser()
        feed = DashboardFeed(history.read, browser.send)
        event = history.commit(1, 0)
        feed.command(Subscribe("r", 0))
        feed.on_event(event)  # ignored: not subscribed until the command is pumped
        await feed.pump()
        feed.on_event(event)  # published late, after the snapshot already held it
        feed.on_event(history.commit(2, 1))
        await feed.pump()
        assert browser.steps() == [0, 1]
        assert [f["seq"] for f in browser.frames] == [1, 2]

    asyncio.run(scenario())


def test_an_event_that_does_not_follow_the_last_one_sent_triggers_a_catch_up() -> None:
    async def scenario() -> None:
        history, browser = History(), Browser()
        feed = DashboardFeed(history.read, browser.send)
        feed.command(Subscribe("r", 0))
        await feed.pump()
        history.commit(1, 0)  # committed, but its event never reached this feed
        feed.on_event(history.commit(2, 1))
        await feed.pump()
        assert browser.steps() == [0, 1]

    asyncio.run(scenario())


def test_run_updates_are_coalesced_to_the_latest_state() -> None:
    async def scenario() -> None:
        browser = Browser()
        feed = DashboardFeed(History().read, browser.send)
        for status in ("running", "finished"):
            feed.on_event(RunChanged(RunInfo("r", "p", "n", status, 1.0, 2.0, {})))
        await feed.pump()
        assert [(f["type"], f["run"]["status"]) for f in browser.frames] == [("run", "finished")]

    asyncio.run(scenario())


def test_an_event_without_a_frame_is_answered_from_storage() -> None:
    """Ingest builds no frame for a run nobody followed when it committed."""

    async def scenario() -> None:
        history, browser = History(), Browser()
        feed = DashboardFeed(history.read, browser.send)
        feed.command(Subscribe("r", 0))
        await feed.pump()
        event = history.commit(1, 5)
        feed.on_event(PointsCommitted(event.run_id, event.prev_seq, event.seq, b""))
        await feed.pump()
        assert browser.steps() == [5]

    asyncio.run(scenario())


def test_followers_count_the_runs_that_open_dashboards_follow() -> None:
    followers = Followers()
    first = DashboardFeed(History().read, Browser().send, followers=followers)
    second = DashboardFeed(History().read, Browser().send, followers=followers)
    first.command(Subscribe("r", 0))
    first.command(Subscribe("r", 3))  # again: still one follower
    second.command(Subscribe("r", 0))
    first.command(Unsubscribe("r"))
    assert "r" in followers
    second.close()
    assert "r" not in followers


def test_a_stalled_dashboards_queue_is_bounded_in_bytes_too() -> None:
    """1024 events whatever their size: a client's batch of 16,384 values frames as
    about 0.64 MB of JSON, so one browser that stopped reading pinned about 650 MB
    before it fell back to storage. Past max_queued_bytes it falls back at once."""
    history, browser = History(), Browser()
    big = [(s, 0.0, {f"k{i}": 1.0 / (s + i + 1) for i in range(16)}) for s in range(1024)]
    frame = encode_json(Points(run="r", seq=1, series=series_from_rows(big)))  # type: ignore[arg-type]

    def commit(seq: int) -> PointsCommitted:  # stored as one step; framed big
        history.commit(seq, seq)
        return PointsCommitted("r", seq - 1, seq, frame)

    async def scenario() -> None:
        feed = DashboardFeed(history.read, browser.send, max_queued_bytes=10 * len(frame))
        feed.command(Subscribe("r", 0))
        await feed.pump()
        for seq in range(1, 11):  # the browser reads nothing; ten frames fit
            feed.on_event(commit(seq))
        assert feed.overflows == 0
        feed.on_event(commit(11))
        assert feed.overflows == 1
        await feed.pump()  # caught up from storage, nothing lost
        assert browser.steps() == list(range(1, 12))

    asyncio.run(scenario())


def test_a_dashboard_follows_a_bounded_number_of_runs_and_is_told_past_it() -> None:
    """Each followed run costs a catch-up read and a place in every commit's fan-out:
    a client subscribing to ever new run ids grew the server's memory without end."""
    feed = DashboardFeed(History().read, Browser().send)
    for n in range(fanout.MAX_FOLLOWED):
        feed.command(Subscribe(f"r{n}", 0))
    feed.command(Subscribe("r0", 0))  # one already followed: fine
    with pytest.raises(ProtocolError, match="at most 1000 runs"):
        feed.command(Subscribe("one-more", 0))
    feed.command(Unsubscribe("r1"))
    feed.command(Subscribe("one-more", 0))  # room again
    for _ in range(fanout.MAX_PENDING_COMMANDS - len(feed._commands)):
        feed.command(Subscribe("r0", 0))
    with pytest.raises(ProtocolError, match="commands waiting"):
        feed.command(Subscribe("r0", 0))


def test_a_dashboard_is_told_of_a_run_id_no_run_can_have_and_follows_nothing() -> None:
    """Follows were bounded by count alone: 1,000 ids of 16 MiB each (one read-only
    share link) were kept, and echoed back, for gigabytes of the server's memory."""
    followers = Followers()
    feed = DashboardFeed(History().read, Browser().send, followers=followers)
    huge = "x" * (1 << 20)
    with pytest.raises(ProtocolError, match="is longer than 255 bytes") as refused:
        feed.command(Subscribe(huge, 0))
    assert len(str(refused.value)) < 100  # the browser is told; not its megabyte back
    with pytest.raises(ProtocolError, match="must be a name") as refused:
        feed.command(Unsubscribe("a/" + huge))
    assert len(str(refused.value)) < 100
    assert huge not in followers and not feed._commands


def test_a_run_unsubscribed_during_its_catch_up_gets_no_more_parts() -> None:
    """The catch-up of a long run comes in parts, each an awaited send; the browser
    may unsubscribe (deselect the run, or the tab asks for another) meanwhile. The
    parts still to come are of a run it no longer follows: millions of points it
    would throw away, sent before any of its other commands is carried out."""
    history = History()
    for seq in range(1, 5):  # four commits of a part's size each: four parts
        first = (seq - 1) * 50_000
        history.batches[seq] = list(range(first, first + 50_000))
    frames: list[int] = []
    feed: DashboardFeed

    async def send(frame: bytes) -> None:
        message = json.loads(frame)
        if message["type"] == "points":
            frames.append(message["seq"])
            if len(frames) == 1:
                feed.command(Unsubscribe("r"))  # arrives while the first part is out

    async def scenario() -> None:
        nonlocal feed
        feed = DashboardFeed(history.read, send)
        feed.command(Subscribe("r", 0))
        await feed.pump()

    asyncio.run(scenario())
    assert frames == [1]
