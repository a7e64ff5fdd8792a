"""The one exception hierarchy of trainwire.

::

    TrainwireError
     ├─ ConfigError          (bad settings or misuse; says how to fix it)
     ├─ ProtocolError        (pure core: malformed or out-of-order message)
     │   └─ VersionMismatch
     ├─ TransportError       (I/O layer; wraps websockets / OS errors)
     │   └─ TransientError   (retry with backoff)
     └─ StorageError         (wraps sqlite3 errors)

Errors from ``websockets`` and ``sqlite3`` are translated into these at the I/O
boundary (``raise ... from exc``); callers decide on retries from the class.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ProtocolError",
    "StorageError",
    "TrainwireError",
    "TransientError",
    "TransportError",
    "VersionMismatch",
]


class TrainwireError(Exception):
    """Base class of every error trainwire raises."""


class ConfigError(TrainwireError):
    """Invalid settings or API misuse."""


class ProtocolError(TrainwireError):
    """A peer sent a frame the protocol does not allow.

    Attributes:
        code: the WebSocket close code the receiving shell should close with.
        reason: a short reason for the close frame (at most 123 bytes).
    """

    def __init__(self, reason: str, code: int = 1003) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = _fit_close_reason(reason)


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version this side does not."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code=4001)


class TransportError(TrainwireError):
    """The connection to the server failed."""


class TransientError(TransportError):
    """A failure worth retrying after a backoff."""


class StorageError(TrainwireError):
    """The metrics store failed."""


def _fit_close_reason(reason: str) -> str:
    # RFC 6455 section 5.5: a control frame's payload is at most 125 bytes, two of
    # which carry the close code.
    data = reason.encode()
    if len(data) <= 123:
        return reason
    return data[:120].decode(errors="ignore") + "..."
