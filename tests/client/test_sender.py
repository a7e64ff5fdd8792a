"""The sender's flush pacing: fast loops are batched harder, slow ones keep their latency."""

from __future__ import annotations

from collections import deque

import pytest

from trainwire.client.sender import MAX_FLUSH_INTERVAL, STRETCH_RATE, Sender
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
