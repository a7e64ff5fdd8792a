"""Caps on what one client may take: connections per address, new runs per minute."""

from __future__ import annotations

from collections import Counter, deque

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ConnectionLimitMiddleware", "RateLimiter", "client_address"]


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimiter:
    """At most ``limit`` events per ``period`` seconds per key. Time is a parameter.

    An event may name what it is about (``item``: a new run's id): the same item
    again within the period is allowed and not counted, so writers of one new run
    that say hello together (the ranks of a job) count as one new run.
    """

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._events: dict[str, deque[tuple[float, object]]] = {}

    def allow(self, key: str, now: float, item: object = None) -> bool:
        """Record an event for ``key`` if it is within the limit; False if not."""
        events = self._events.setdefault(key, deque())
        while events and events[0][0] <= now - self.period:
            events.popleft()
        if item is not None and any(seen == item for _, seen in events):
            return True
        if len(events) >= self.limit:
            return False
        events.append((now, item))
        return True


class ConnectionLimitMiddleware:
    """Refuses a WebSocket beyond ``limit`` open ones from the same address, with a
    close reason; the others are untouched."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._open: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        address = client_address(scope)
        if self._open[address] >= self.limit:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                reason = f"too many connections from {address} (limit {self.limit})"
                await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        self._open[address] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]
