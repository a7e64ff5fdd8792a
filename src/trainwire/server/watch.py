"""Deciding that a trainer has vanished: a run is ``crashed`` once none of its
writers has been connected for ``timeout`` seconds. Time is a parameter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = ["RunWatch"]


class RunWatch:
    """Which runs have a live trainer connection, and since when they have none.

    A connection counts as a heartbeat for as long as it is open: both ends ping it,
    so a dead one is closed within seconds. A run still ``running`` when the server
    starts gets ``timeout`` seconds from then to reconnect, so a server restart
    alone crashes nothing.
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self._started = now
        # run -> its writers' streams with a connection open -> how many
        self._connections: dict[str, Counter[str]] = {}
        self._last_seen: dict[str, float] = {}

    def connected(self, run_id: str, stream: str = "") -> None:
        self._connections.setdefault(run_id, Counter())[stream] += 1

    def disconnected(self, run_id: str, now: float, stream: str = "") -> None:
        streams = self._connections.get(run_id)
        if streams is not None:
            streams[stream] -= 1
            if streams[stream] <= 0:
                del streams[stream]
            if not streams:
                del self._connections[run_id]
        self._last_seen[run_id] = now

    def streams(self, run_id: str) -> set[str]:
        """The run's streams whose writer has a connection open now."""
        return set(self._connections.get(run_id, ()))

    def overdue(self, running: Iterable[str], now: float) -> list[str]:
        """The runs among ``running`` whose trainers have been gone too long."""
        return [
            run_id
            for run_id in running
            if run_id not in self._connections
            and now - self._last_seen.get(run_id, self._started) > self.timeout
        ]

    def forget(self, run_id: str) -> None:
        self._last_seen.pop(run_id, None)
