"""The two ends of a trainer connection, as state machines that do no I/O.

The caller pumps them: hand in frames as they arrive (``receive_frame``), then
send whatever ``frames_to_send`` returns. The client's sender thread and the
server's ingest endpoint are thin shells around these classes.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from typing import Final, assert_never

import msgspec

from trainwire.exceptions import ProtocolError, VersionMismatch
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Finish,
    FinishStatus,
    Hello,
    Row,
    RunSpec,
    ServerToTrainer,
    TrainerToServer,
    Welcome,
)

__all__ = ["ClientSession", "ConnectionState", "ServerSession"]

_encoder: Final = msgspec.msgpack.Encoder()
_trainer_decoder: Final[msgspec.msgpack.Decoder[TrainerToServer]] = msgspec.msgpack.Decoder(
    TrainerToServer
)
_server_decoder: Final[msgspec.msgpack.Decoder[ServerToTrainer]] = msgspec.msgpack.Decoder(
    ServerToTrainer
)


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"
    AWAITING_WELCOME = "awaiting welcome"
    OPEN = "open"


class ClientSession:
    """Client side of the trainer protocol. Performs no I/O; the caller pumps it.

    Rows handed to :meth:`add_rows` are cut into sequenced batches, and each batch
    is kept until the server acknowledges it, across any number of reconnects.

    Args:
        run: the run this session writes to.
        rows_per_batch: the most rows in one ``batch`` frame.
        client: a free-form client description sent in ``hello``.
    """

    def __init__(self, run: RunSpec, *, rows_per_batch: int = 1000, client: str = "") -> None:
        if rows_per_batch < 1:
            raise ValueError("rows_per_batch must be at least 1")
        self.run = run
        self.rows_per_batch = rows_per_batch
        self.client = client
        self.state = ConnectionState.DISCONNECTED
        self._pending: deque[Row] = deque()
        self._unacked: deque[Batch | Finish] = deque()
        self._unsent = 0  # how many of the newest unacked items are not on the wire yet
        self._next_seq = 1
        self._finish_status: FinishStatus | None = None
        self._finish_acked = False
        self.acked_seq = 0

    # -- input from the training side ---------------------------------------------

    def add_rows(self, rows: Iterable[Row]) -> None:
        """Queue rows for sending. Call :meth:`frames_to_send` afterwards."""
        if self._finish_status is not None:
            raise ProtocolError("the run is finished", code=1008)
        self._pending.extend(rows)

    def finish(self, status: FinishStatus = "finished") -> None:
        """Queue the end of the run, after every row already added."""
        if self._finish_status is None:
            self._finish_status = status

    # -- input from the connection --------------------------------------------------

    def connection_made(self) -> bytes:
        """A connection is open: returns the ``hello`` frame to send first."""
        self.state = ConnectionState.AWAITING_WELCOME
        return _encoder.encode(Hello(v=PROTOCOL_VERSION, run=self.run, client=self.client))

    def connection_lost(self) -> None:
        """The connection is gone: whatever was not acknowledged will be sent again."""
        self.state = ConnectionState.DISCONNECTED
        self._unsent = len(self._unacked)

    def receive_frame(self, data: bytes) -> ServerToTrainer:
        """Take one server frame.

        Returns:
            the decoded message, already applied to the session.

        Raises:
            ProtocolError: the frame is malformed or unexpected.
        """
        try:
            message = _server_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed server frame: {exc}") from exc
        match message:
            case Welcome(v=v, last_seq=last_seq):
                if v != PROTOCOL_VERSION:
                    raise VersionMismatch(f"server speaks protocol {v}, client {PROTOCOL_VERSION}")
                self.state = ConnectionState.OPEN
                if not self._unacked and self._next_seq == 1:
                    # A resumed run: continue its numbering.
                    self._next_seq = last_seq + 1
                self._drop_acked(last_seq)
                self._unsent = len(self._unacked)
            case Ack(seq=seq):
                if self.state is not ConnectionState.OPEN:
                    raise ProtocolError("ack before welcome", code=1008)
                self._drop_acked(seq)
        return message

    def _drop_acked(self, seq: int) -> None:
        while self._unacked and self._unacked[0].seq <= seq:
            item = self._unacked.popleft()
            if isinstance(item, Finish):
                self._finish_acked = True
        self.acked_seq = max(self.acked_seq, seq)
        self._unsent = min(self._unsent, len(self._unacked))

    # -- output ---------------------------------------------------------------------

    def frames_to_send(self) -> list[bytes]:
        """Frames to write now, in order; empty unless the session is open."""
        if self.state is not ConnectionState.OPEN:
            return []
        while self._pending:
            n = min(self.rows_per_batch, len(self._pending))
            rows = [self._pending.popleft() for _ in range(n)]
            self._push(Batch(seq=self._next_seq, rows=rows))
        if self._finish_status is not None and not self._finish_queued:
            self._push(Finish(seq=self._next_seq, status=self._finish_status))
        first = len(self._unacked) - self._unsent
        frames = [_encoder.encode(self._unacked[i]) for i in range(first, len(self._unacked))]
        self._unsent = 0
        return frames

    def _push(self, item: Batch | Finish) -> None:
        self._unacked.append(item)
        self._unsent += 1
        self._next_seq += 1

    @property
    def _finish_queued(self) -> bool:
        return self._finish_acked or any(isinstance(i, Finish) for i in self._unacked)

    # -- observation ----------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows not yet acknowledged by the server (queued or in flight)."""
        in_flight = sum(len(i.rows) for i in self._unacked if isinstance(i, Batch))
        return len(self._pending) + in_flight

    @property
    def done(self) -> bool:
        """True once the server has acknowledged the run's end."""
        return self._finish_acked

    def drop_oldest_pending(self, n: int) -> int:
        """Forget up to ``n`` of the oldest rows not yet cut into batches.

        Returns:
            how many rows were dropped.
        """
        dropped = 0
        while self._pending and dropped < n:
            self._pending.popleft()
            dropped += 1
        return dropped


class ServerSession:
    """Server side of one trainer connection. Performs no I/O; the caller pumps it.

    After :meth:`receive_frame` returns a message, the caller acts on it (opens the
    run, commits the batch) and reports back with :meth:`run_opened` or
    :meth:`committed`, which queue the reply for :meth:`frames_to_send`.
    """

    def __init__(self) -> None:
        self.run: RunSpec | None = None
        self.last_seq = 0
        self._outbox: list[bytes] = []

    def receive_frame(self, data: bytes) -> TrainerToServer | None:
        """Take one trainer frame.

        Returns:
            the message the caller must act on, or None when there is nothing to do
            (a batch already stored, whose acknowledgement is already queued).

        Raises:
            ProtocolError: close the connection with its ``code`` and ``reason``.
        """
        try:
            message = _trainer_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed frame: {exc}") from exc
        match message:
            case Hello(v=v):
                if v != PROTOCOL_VERSION:
                    raise VersionMismatch(
                        f"unsupported protocol version {v}; this server speaks {PROTOCOL_VERSION}"
                    )
                if self.run is not None:
                    raise ProtocolError("hello sent twice", code=1008)
                return message
            case Batch(seq=seq) | Finish(seq=seq):
                if self.run is None:
                    raise ProtocolError(f"{type(message).__name__.lower()} before hello", code=1008)
                if seq < 1:
                    raise ProtocolError(f"sequence numbers start at 1, got {seq}")
                if seq <= self.last_seq:
                    # Resent after a reconnect, and already stored: acknowledge only.
                    self._outbox.append(_encoder.encode(Ack(seq=seq)))
                    return None
                return message
            case _:
                assert_never(message)

    def run_opened(self, run: RunSpec, last_seq: int) -> None:
        """The run named in ``hello`` is open in storage, holding batches up to ``last_seq``."""
        self.run = run
        self.last_seq = last_seq
        self._outbox.append(
            _encoder.encode(Welcome(v=PROTOCOL_VERSION, run_id=run.id, last_seq=last_seq))
        )

    def committed(self, seq: int) -> None:
        """The batch (or finish) ``seq`` is durably stored: acknowledge it."""
        self.last_seq = max(self.last_seq, seq)
        self._outbox.append(_encoder.encode(Ack(seq=seq)))

    def frames_to_send(self) -> list[bytes]:
        frames, self._outbox = self._outbox, []
        return frames


def encode_trainer_message(message: TrainerToServer) -> bytes:
    """Encode a trainer frame (used by tests and tools that speak the protocol)."""
    return _encoder.encode(message)
