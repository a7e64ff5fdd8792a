"""The seam between ingest and fan-out.

Ingest publishes an event after each commit; every dashboard connection
subscribes. :class:`MemoryBus` serves one server process; a Redis bus will let
several server processes share one stream of events behind the same interface.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from trainwire.protocol.messages import RunInfo

__all__ = ["Bus", "BusEvent", "MemoryBus", "PointsCommitted", "RunChanged"]

logger = logging.getLogger("trainwire.server")


@dataclass(frozen=True)
class PointsCommitted:
    """A batch of run ``run_id`` is stored; its sequence number went from
    ``prev_seq`` to ``seq``. ``frame`` is the JSON ``points`` frame for browsers,
    encoded once for all of them."""

    run_id: str
    prev_seq: int
    seq: int
    frame: bytes


@dataclass(frozen=True)
class RunChanged:
    """A run was created or changed status."""

    run: RunInfo


BusEvent = PointsCommitted | RunChanged
Handler = Callable[[BusEvent], None]


class Bus(Protocol):
    """Publish/subscribe between ingest and dashboards.

    Handlers are called on the server's event loop and must not block: they only
    queue the event (see :mod:`trainwire.server.fanout`).
    """

    async def publish(self, event: BusEvent) -> None: ...

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for every later event; returns the unsubscribe function."""
        ...

    async def close(self) -> None: ...


class MemoryBus:
    """A :class:`Bus` inside one process."""

    def __init__(self) -> None:
        self._handlers: dict[int, Handler] = {}
        self._next_id = 0

    async def publish(self, event: BusEvent) -> None:
        for handler in list(self._handlers.values()):
            handler(event)

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        token = self._next_id
        self._next_id += 1
        self._handlers[token] = handler

        def unsubscribe() -> None:
            self._handlers.pop(token, None)

        return unsubscribe

    async def close(self) -> None:
        self._handlers.clear()
