"""The sender's pacing: fast loops are batched harder, slow ones keep their latency, and
an idle sender sleeps until log() wakes it."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import pytest
from tests.conftest import MS, LiveServer, wait_until

import trainwire
from trainwire.client import sender as sender_module, tensors as tensors_module
from trainwire.client.sender import (
    IDLE_WAIT,
    MAX_FLUSH_INTERVAL,
    STRETCH_RATE,
    LoggedRow,
    Sender,
)
from trainwire.client.spool import SpillingOutbox, new_header
from trainwire.exceptions import ConfigError
from trainwire.protocol.limits import MAX_CONFIG_DEPTH
from trainwire.protocol.messages import RunSpec
from trainwire.protocol.session import ClientSession


def sender(flush_interval: float) -> Sender:
    session = ClientSession(RunSpec(id="r", project="p", name="n"))
    return Sender(session, deque(), None, flush_interval=flush_interval)


def test_up_to_the_stretch_rate_the_flush_interval_is_kept() -> None:
    s = sender(0.02)
    for rate in (0.0, 1.0, 100.0, STRETCH_RATE):
        assert s.interval_for(rate) == 0.02


def test_a_faster_loop_stretches_the_interval_in_proportion_up_to_the_cap() -> None:
    s = sender(0.02)
    assert s.interval_for(2 * STRETCH_RATE) == pytest.approx(0.04)
    assert s.interval_for(4 * STRETCH_RATE) == pytest.approx(0.08)
    assert s.interval_for(1000 * STRETCH_RATE) == MAX_FLUSH_INTERVAL


def test_an_interval_chosen_above_the_cap_is_never_shortened() -> None:
    s = sender(0.5)
    assert s.interval_for(1000 * STRETCH_RATE) == 0.5


class _LoggingLoop:
    """Stands in for the sender's clock and its Event: each wait is time passing while
    a loop logs ``rate`` rows a second; close() never comes."""

    def __init__(self, sender: Sender, rate: float) -> None:
        self.sender, self.rate, self.now, self.waits = sender, rate, 0.0, list[float]()

    def monotonic(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        for _ in range(round(timeout * self.rate)):
            self.sender.queue.append((None, self.now, {"x": 1.0}))
        self.now += timeout
        return False


@pytest.mark.parametrize(
    ("rate", "expected"), [(2000.0, MAX_FLUSH_INTERVAL), (250.0, 0.04), (0.0, IDLE_WAIT)]
)
def test_waiting_to_retry_drains_at_a_connected_senders_pace(
    monkeypatch: pytest.MonkeyPatch, rate: float, expected: float
) -> None:
    # The server is away: logged rows are still converted while the sender backs off,
    # but a fast loop is not woken every flush_interval for it, nor an idle one.
    s = sender(0.02)
    loop = _LoggingLoop(s, rate)
    monkeypatch.setattr(sender_module, "time", loop)
    monkeypatch.setattr(s, "_wake", loop)
    s._wait_to_retry(30.0)
    assert loop.now == pytest.approx(30.0)
    assert loop.waits[0] == 0.02
    paced = loop.waits[1:-1]  # after the first drain, before the last, cut short
    assert paced == [pytest.approx(expected)] * len(paced)
    assert s.session.queued_rows + s.session.outbox.rows == round(30.0 * rate) - len(s.queue)


def test_an_idle_sender_sleeps_until_log_wakes_it(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were log() not to wake it, the point below would wait out this minute.
    monkeypatch.setattr(sender_module, "IDLE_WAIT", 60.0)
    run = trainwire.init(url=live_server.url)
    run.log({"x": 1.0}, step=0)
    assert wait_until(lambda: run._sender.idle, 5000 * MS), "never went idle"
    run.log({"x": 2.0}, step=1)
    assert wait_until(lambda: len(_points(live_server, run.id)) == 2, 5000 * MS)
    # close() wakes it too: finish() returns well inside its timeout, all delivered.
    assert wait_until(lambda: run._sender.idle, 5000 * MS)
    run.finish(timeout=10)
    assert run.delivered
    assert _points(live_server, run.id) == [1.0, 2.0]


def test_an_idle_offline_run_is_woken_by_log_and_by_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "IDLE_WAIT", 60.0)
    run = trainwire.init(mode="offline")
    assert wait_until(lambda: run._sender.idle, 5000 * MS), "never went idle"
    run.log({"x": 1.0}, step=0)
    assert wait_until(lambda: run._sender.session.outbox.rows == 1, 5000 * MS)
    started = time.monotonic()
    run.finish(timeout=30)
    assert time.monotonic() - started < 10  # not the minute of IDLE_WAIT
    outbox = SpillingOutbox.open_existing(run.path)
    items = outbox.items(1, 10)
    outbox.close()
    assert [type(item).__name__ for item in items] == ["Batch", "Finish"]


def _points(server: LiveServer, run_id: str) -> list[float]:
    series = server.store.metrics(run_id)[1]
    return series["x"].value if "x" in series else []


def test_a_row_log_vouched_for_goes_out_as_it_is_and_others_are_checked() -> None:
    np = pytest.importorskip("numpy")
    s = sender(0.02)
    plain = (0, 1.0, {"loss": 0.5})
    s.queue.append(plain)
    s._drain()
    s.queue.append((None, 2.0, {"loss": 0.25}))  # no step: one more than the last
    s.queue.append((None, 3.0, {1: 2, "acc": np.float32(0.5)}, False))  # log() could not vouch
    s._drain()
    [first, second] = s.session.outbox.items(1, 10)
    assert first.rows[0] is plain  # not copied, not converted: one pass over the queue
    assert second.rows == [(1, 2.0, {"loss": 0.25}), (2, 3.0, {"1": 2.0, "acc": 0.5})]
    assert all(type(v) is float for _, _, row in second.rows for v in row.values())


def test_a_key_that_cannot_be_made_a_string_costs_its_own_value_only() -> None:
    """Its ``__str__`` raised in the middle of the drain: every row logged in that
    flush interval was lost, uncounted, and the run still said it was delivered."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no name")

    s = sender(0.02)
    s.queue.append((0, 1.0, {"x": 1.0}))
    s.queue.append((1, 2.0, {Unprintable(): 1.0, "x": 2.0}, False))
    s.queue.append((2, 3.0, {"x": 3.0}))
    s._drain()
    [batch] = s.session.outbox.items(1, 10)
    assert batch.rows == [(0, 1.0, {"x": 1.0}), (1, 2.0, {"x": 2.0}), (2, 3.0, {"x": 3.0})]
    assert s.dropped_values == 1


def test_a_value_dropped_is_said_in_the_user_s_terms(caplog: pytest.LogCaptureFixture) -> None:
    """2**2000 was "int is not a number", and a vector "Tensor is not a number"."""
    torch = pytest.importorskip("torch")
    s = sender(0.02)
    row = {"huge": 2**2000, "vec": torch.ones(3), "name": "adam", "one": torch.ones(1, 1)}
    s.queue.append((0, 1.0, row, False))
    s._drain()
    said = [r.getMessage() for r in caplog.records]
    assert "trainwire dropped the value of 'huge': int too large for a float" in said
    assert "trainwire dropped the value of 'vec': Tensor of shape [3] is not one number" in said
    assert "trainwire dropped the value of 'name': str is not a number" in said
    [batch] = s.session.outbox.items(1, 10)
    assert batch.rows == [(0, 1.0, {"one": 1.0})] and s.dropped_values == 3


def test_a_step_with_no_fraction_is_taken_whatever_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """step=epoch * 1.0, or a numpy float64, dropped its row as "not an integer"."""
    np = pytest.importorskip("numpy")
    s = sender(0.02)
    for step in (2.0, np.float64(3.0), np.int32(4), 4.5, "5", float("nan")):
        s.queue.append((step, 1.0, {"x": 1.0}))
    s._drain()
    [batch] = s.session.outbox.items(1, 10)
    assert [row[0] for row in batch.rows] == [2, 3, 4]
    assert all(type(row[0]) is int for row in batch.rows)
    assert s.dropped_rows == 3
    assert "step 4.5 is not an integer" in caplog.text


def test_a_step_whose_conversion_raises_costs_its_own_row_only() -> None:
    """float(step) runs a user's __float__ (a tensor's): one that raised something
    else than TypeError or ValueError ended the drain, and took the rows drained
    with it."""

    class Odd:
        def __index__(self) -> int:
            raise RuntimeError("device-side assert")

        def __float__(self) -> float:
            raise RuntimeError("device-side assert")

    s = sender(0.02)
    for step in (0, Odd(), 2):
        s.queue.append((step, 1.0, {"x": 1.0}))
    s._drain()
    [batch] = s.session.outbox.items(1, 10)
    assert [row[0] for row in batch.rows] == [0, 2]
    assert s.dropped_rows == 1


def test_log_marks_what_it_cannot_vouch_for_and_every_value_arrives(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    inspected = threading.Event()  # the sender takes nothing until the queue is read
    drain = Sender._drain

    def drain_once_inspected(self: Sender) -> int:
        inspected.wait(5000 * MS)
        return drain(self)

    monkeypatch.setattr(Sender, "_drain", drain_once_inspected)
    run = trainwire.init(url=live_server.url)
    run.log({"a": 1.0, "t": torch.tensor(0.5)}, step=0)  # plain once the tensor is read
    run.log({"a": 2.0, 3: 4, "n": torch.tensor(5)}, step=1)  # an int key and int values
    queued = list(run._queue)
    inspected.set()
    run.finish()
    assert [len(row) for row in queued] == [3, 4]
    series = live_server.store.metrics(run.id)[1]
    assert (series["a"].value, series["t"].value) == ([1.0, 2.0], [0.5])
    assert (series["3"].value, series["n"].value) == ([4.0], [5.0])


def test_rows_logged_behind_a_value_still_being_copied_wait_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    copied = False  # stands for a GPU copy's event: done once this is True
    monkeypatch.setattr(tensors_module._Pending, "ready", lambda pending: copied)
    s = sender(0.02)
    s.queue.append((0, 1.0, {"loss": torch.tensor(0.5)}, False))  # as log() marks a tensor
    s._drain()
    s.queue.append((1, 2.0, {"loss": 0.25}))  # plain floats: they still queue behind
    s._drain()
    assert s.session.outbox.items(1, 10) == []
    copied = True
    s._drain()
    [batch] = s.session.outbox.items(1, 10)
    assert batch.rows == [(0, 1.0, {"loss": 0.5}), (1, 2.0, {"loss": 0.25})]


def test_init_refuses_a_config_the_server_would_refuse() -> None:
    """Too deep a config would have the server refuse the run's hello, and so every
    row of the run: init() raises, as for any bad configuration."""
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(MAX_CONFIG_DEPTH):
        deep = {"a": deep}
    with pytest.raises(ConfigError, match="deeper than"):
        trainwire.init(mode="offline", config=deep)
    trainwire.init(mode="offline", config={"model": {"layers": [{"width": 64}]}}).finish()


@pytest.mark.parametrize(
    ("run_id", "problem"),
    [
        ("sweep/lr-0.1", "without /"),
        ("..", "without /"),
        ("a\\b", "without /"),
        ("tab\there", "control characters"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_init_refuses_a_run_id_no_page_or_file_could_name(
    run_id: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken, such an id lost the run: with a / the run was stored but no REST route
    or dashboard page could reach it, and its file went elsewhere (..); too long
    for a file name, an offline run's file was never written (a traceback instead)."""
    with pytest.raises(ConfigError, match=problem):
        trainwire.init(mode="offline", id=run_id)
    with pytest.raises(ConfigError, match=problem):
        trainwire.init(mode="offline", resume=run_id)
    monkeypatch.setenv("TRAINWIRE_RUN_ID", run_id)
    with pytest.raises(ConfigError, match=problem):
        trainwire.init(mode="offline")
    monkeypatch.delenv("TRAINWIRE_RUN_ID")
    run = trainwire.init(mode="offline", id="sweep-lr-0.1 (seed 3)" + "x" * 230)
    run.log({"x": 1.0})
    run.finish()
    assert run.path.exists()


def test_after_a_connection_timed_out_rows_that_would_go_stale_while_it_blocks_go_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that takes connections but never answers (stopped, hung on its disk)
    blocks each attempt for its whole timeout, draining nothing and moving nothing
    to the file: rows held in memory aged past SPILL_AFTER meanwhile, and a trainer
    killed during an attempt lost up to SPILL_AFTER + OPEN_TIMEOUT seconds of them
    (7.4 s measured, against "at most the last 5 s"). Found by review."""
    import socket

    monkeypatch.setattr(sender_module, "OPEN_TIMEOUT", 0.2)
    monkeypatch.setattr(sender_module, "SPILL_AFTER", 0.1)
    spec = RunSpec(id="r", project="p", name="n")
    outbox = SpillingOutbox(
        tmp_path / "s.twrun", new_header(spec, "s", None), memory_rows=100, disk_bytes=1 << 20
    )
    queue: deque[LoggedRow] = deque()
    with socket.socket() as hung:  # listening, never accepting: handshakes go unanswered
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        url = f"ws://127.0.0.1:{hung.getsockname()[1]}/ws/ingest"
        s = Sender(ClientSession(spec, stream="s", outbox=outbox), queue, url)
        queue.append((0, time.time(), {"x": 0.0}))
        with pytest.raises(TimeoutError):
            s._connect_and_pump(url)  # the first attempt: a server may well answer
        assert not outbox.spilling and outbox.held_since is not None
        outbox.drop_through(1)  # as if delivered: a row batched just now is held alone
        queue.append((1, time.time(), {"x": 1.0}))
        with pytest.raises(TimeoutError):
            s._connect_and_pump(url)  # after a timeout: the row goes before it blocks
        assert outbox.spilling and outbox.held_since is None
        assert [row[0] for item in outbox.items(2, 10) for row in item.rows] == [1]  # type: ignore[union-attr]
    outbox.close()
