"""The two ends of a trainer connection, as state machines that do no I/O.

The caller pumps them: hand in frames as they arrive (``receive_frame``), then
send whatever ``frames_to_send`` returns. The client's sender thread and the
server's ingest endpoint are thin shells around these classes.
"""

from __future__ import annotations

import enum
import itertools
import operator
from collections import deque
from collections.abc import Iterable
from typing import Final, TypeVar, assert_never

import msgspec

from trainwire.exceptions import ProtocolError, VersionMismatch
from trainwire.protocol.limits import (
    BATCH_VALUES,
    MAX_CONFIG_DEPTH,
    MAX_KEY_LENGTH,
    MAX_KEYS_PER_RUN,
    MAX_ROWS_PER_BATCH,
    key_name_problem,
    nests_deeper_than,
    run_id_problem,
)
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
from trainwire.protocol.outbox import MemoryOutbox, Outbox

__all__ = ["ClientSession", "ConnectionState", "ServerSession"]

T = TypeVar("T")

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

    Rows handed to :meth:`add_rows` are cut into sequenced batches (connected or
    not) and kept in the outbox until the server acknowledges them, across any
    number of reconnects. At most ``window`` items are in flight at once, so a long
    backlog is read from the outbox a little at a time.

    Args:
        run: the run this session writes to.
        stream: this writer's stream of sequence numbers (see :class:`Hello`).
        rank: the writer's rank, when the ranks of a distributed job share the run.
        outbox: where unacknowledged items are kept; a :class:`MemoryOutbox` if omitted.
        next_seq: the first sequence number to use; a stream read back from a file
            (its items already in ``outbox``) continues where the file ended.
        rows_per_batch: the most rows in one ``batch`` frame.
        window: the most items sent and not yet acknowledged.
        client: a free-form client description sent in ``hello``.
        resume: this writer continues a run whose earlier writers are gone (see
            :class:`Hello`).
        replay: this writer uploads a run file whose writer has ended (see
            :class:`Hello`).
    """

    def __init__(
        self,
        run: RunSpec,
        *,
        stream: str = "main",
        rank: int | None = None,
        outbox: Outbox | None = None,
        next_seq: int = 1,
        rows_per_batch: int = 1000,
        window: int = 64,
        client: str = "",
        resume: bool = False,
        replay: bool = False,
    ) -> None:
        if rows_per_batch < 1 or window < 1:
            raise ValueError("rows_per_batch and window must be at least 1")
        self.run = run
        self.stream = stream
        self.rank = rank
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.rows_per_batch = rows_per_batch
        self.window = window
        self.client = client
        self.resume = resume
        self.replay = replay
        self.state = ConnectionState.DISCONNECTED
        self._pending: deque[Row] = deque()
        self._next_seq = next_seq
        self.acked_seq = (self.outbox.first_seq or next_seq) - 1
        self._sent_seq = self.acked_seq  # the last seq written on this connection
        self._finish_status: FinishStatus | None = None
        self._finish_seq: int | None = None
        # Metric keys the server refused (the run holds its most keys), and how many
        # values under them it did not store.
        self.refused_keys: set[str] = set()
        self.refused_values = 0

    # -- input from the training side ---------------------------------------------

    def add_rows(self, rows: Iterable[Row]) -> None:
        """Queue rows for sending. Call :meth:`cut_batches` or :meth:`frames_to_send`."""
        if self._finish_status is not None:
            raise ProtocolError("the run is finished", code=1008)
        self._pending.extend(rows)

    def finish(self, status: FinishStatus = "finished") -> None:
        """Queue the end of the run, after every row already added."""
        if self._finish_status is None:
            self._finish_status = status

    def cut_batches(self) -> bool:
        """Number the queued rows into batches and move them to the outbox.

        Returns:
            False if the outbox's bound stopped it: the rows left stay queued (the
            caller decides whether to drop them); True once every row moved.
        """
        while self._pending:
            n = min(self.rows_per_batch, len(self._pending))
            rows = list(itertools.islice(self._pending, n))
            # A batch over the server's frame limit would be refused at every resend,
            # and every batch after it: bounded by values, not rows alone.
            if sum(map(len, map(_values_of, rows))) > BATCH_VALUES:
                n = _rows_within(rows, BATCH_VALUES)
                rows = rows[:n]
            batch = Batch(seq=self._next_seq, rows=rows)
            while not self.outbox.accepts(batch):
                if n == 1:
                    return False
                n //= 2  # a smaller batch may still fit in what room is left
                batch = Batch(seq=self._next_seq, rows=batch.rows[:n])
            # Appended before the rows leave the queue: an outbox that fails to take the
            # batch (a full disk) leaves them queued, for the next cut.
            self.outbox.append(batch)
            for _ in range(n):
                self._pending.popleft()
            self._next_seq += 1
        if self._finish_status is not None and self._finish_seq is None:
            self._finish_seq = self._next_seq
            self.outbox.append(Finish(seq=self._next_seq, status=self._finish_status))
            self._next_seq += 1
        return True

    # -- input from the connection --------------------------------------------------

    def connection_made(self) -> bytes:
        """A connection is open: returns the ``hello`` frame to send first."""
        self.state = ConnectionState.AWAITING_WELCOME
        hello = Hello(
            v=PROTOCOL_VERSION,
            run=self.run,
            stream=self.stream,
            rank=self.rank,
            client=self.client,
            resume=self.resume,
            replay=self.replay,
        )
        return _encoder.encode(hello)

    def connection_lost(self) -> None:
        """The connection is gone: whatever was not acknowledged will be sent again."""
        self.state = ConnectionState.DISCONNECTED
        self._sent_seq = self.acked_seq

    def receive_frame(self, data: bytes) -> ServerToTrainer:
        """Take one server frame.

        Returns:
            the decoded message, already applied to the session.

        Raises:
            ProtocolError: the frame is malformed or unexpected.
        """
        message = _decode(_server_decoder, data, "malformed server frame")
        match message:
            case Welcome(v=v, last_seq=last_seq):
                if v != PROTOCOL_VERSION:
                    raise VersionMismatch(f"server speaks protocol {v}, client {PROTOCOL_VERSION}")
                self.state = ConnectionState.OPEN
                self._acknowledge(last_seq)
                self._sent_seq = self.acked_seq
            case Ack(seq=seq, refused=refused):
                if self.state is not ConnectionState.OPEN:
                    raise ProtocolError("ack before welcome", code=1008)
                if refused:
                    self._count_refused(seq, refused)
                self._acknowledge(seq)
        return message

    def _count_refused(self, seq: int, keys: list[str]) -> None:
        """The server stored batch ``seq`` without the values of ``keys``."""
        refused = set(keys)
        self.refused_keys |= refused
        if seq > self.acked_seq:  # still held: count what was lost
            for item in self.outbox.items(seq, 1):
                if isinstance(item, Batch) and item.seq == seq:
                    self.refused_values += sum(
                        len(refused.intersection(values)) for _, _, values in item.rows
                    )

    def _acknowledge(self, seq: int) -> None:
        if seq > self.acked_seq:
            self.outbox.drop_through(seq)
            self.acked_seq = seq

    # -- output ---------------------------------------------------------------------

    def frames_to_send(self, *, cut: bool = True) -> list[bytes]:
        """Frames to write now, in order; empty unless the session is open.

        Args:
            cut: first number the queued rows into batches (:meth:`cut_batches`). A
                caller that cuts them itself passes False: an outbox that fails to
                take them (a full disk) then does not hold back what it has.
        """
        if cut:
            self.cut_batches()
        if self.state is not ConnectionState.OPEN:
            return []
        room = self.window - (self._sent_seq - self.acked_seq)
        items = self.outbox.items(self._sent_seq + 1, room)
        if items:
            self._sent_seq = items[-1].seq
        return [_encoder.encode(item) for item in items]

    # -- observation ----------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows not yet acknowledged by the server (queued or in the outbox)."""
        return len(self._pending) + self.outbox.rows

    @property
    def awaiting_server(self) -> bool:
        """True while progress needs the server's next frame: its welcome, or acks to
        open the window for batches already cut and not yet sent (a backlog)."""
        return self.state is not ConnectionState.OPEN or self._sent_seq < self._next_seq - 1

    @property
    def done(self) -> bool:
        """True once the server has acknowledged the run's end."""
        return self._finish_seq is not None and self.acked_seq >= self._finish_seq

    @property
    def delivered(self) -> bool:
        """True once the server has acknowledged everything added so far."""
        return not self._pending and self.acked_seq == self._next_seq - 1

    @property
    def queued_rows(self) -> int:
        """Rows not yet cut into batches."""
        return len(self._pending)

    @property
    def finishing(self) -> bool:
        """True once :meth:`finish` was called."""
        return self._finish_status is not None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def drop_newest_pending(self, n: int) -> int:
        """Forget up to ``n`` of the newest rows not yet cut into batches.

        Returns:
            how many rows were dropped.
        """
        dropped = min(n, len(self._pending))
        for _ in range(dropped):
            self._pending.pop()
        return dropped

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

    How many keys a run may have is not checked here but in the store, where every
    writer of the run meets; ``max_known_keys`` only bounds how many key names a
    connection remembers as checked (the run's key limit is the natural bound).
    """

    def __init__(
        self,
        *,
        max_rows_per_batch: int = MAX_ROWS_PER_BATCH,
        max_key_length: int = MAX_KEY_LENGTH,
        max_known_keys: int = MAX_KEYS_PER_RUN,
    ) -> None:
        self.run: RunSpec | None = None
        self.hello: Hello | None = None
        self.last_seq = 0
        self.max_rows_per_batch = max_rows_per_batch
        self.max_key_length = max_key_length
        self.max_known_keys = max_known_keys
        self._known_keys: set[str] = set()
        self._replies: list[bytes] = []

    def receive_frame(self, data: bytes) -> TrainerToServer | None:
        """Take one trainer frame.

        Returns:
            the message the caller must act on, or None when there is nothing to do
            (a batch already stored, whose acknowledgement is already queued).

        Raises:
            ProtocolError: close the connection with its ``code`` and ``reason``.
        """
        message = _decode(_trainer_decoder, data, "malformed frame")
        match message:
            case Hello(v=v, run=run):
                if v != PROTOCOL_VERSION:
                    raise VersionMismatch(
                        f"unsupported protocol version {v}; this server speaks {PROTOCOL_VERSION}"
                    )
                if self.run is not None:
                    raise ProtocolError("hello sent twice", code=1008)
                # The id is a path segment of every route of the run: one with a
                # separator would be stored where no page or REST call reaches it.
                problem = run_id_problem(run.id)
                if problem is not None:
                    raise ProtocolError(problem)
                for name, value in (("config", run.config), ("env", run.env)):
                    if nests_deeper_than(value, MAX_CONFIG_DEPTH):
                        raise ProtocolError(f"{name} nested deeper than {MAX_CONFIG_DEPTH} levels")
                    # Stored as JSON: msgpack allows map keys JSON has no room for.
                    try:
                        msgspec.json.encode(value)
                    except (TypeError, ValueError, RecursionError) as exc:
                        raise ProtocolError(f"{name} must be JSON-like: {exc}") from None
                return message
            case Batch(seq=seq) | Finish(seq=seq):
                if self.run is None:
                    raise ProtocolError(f"{type(message).__name__.lower()} before hello", code=1008)
                if seq < 1:
                    raise ProtocolError(f"sequence numbers start at 1, got {seq}")
                if seq <= self.last_seq:
                    # Resent after a reconnect, and already stored: acknowledge only.
                    self._replies.append(_encoder.encode(Ack(seq=seq)))
                    return None
                if isinstance(message, Batch):
                    self._check_batch(message)
                return message
            case _:
                assert_never(message)

    def _check_batch(self, batch: Batch) -> None:
        if len(batch.rows) > self.max_rows_per_batch:
            raise ProtocolError(
                f"batch of {len(batch.rows)} rows exceeds {self.max_rows_per_batch}", code=1008
            )
        known = self._known_keys
        # Keys new to this connection, which the store looks up under its lock (every
        # trainer and dashboard waits for it): bounded by what a Python client may
        # send in one batch (BATCH_VALUES values, or one row of at most the run's key
        # limit), never by the run's key limit itself, which must not close a writer.
        most = max(self.max_known_keys, BATCH_VALUES)
        new = 0
        unremembered: set[str] = set()  # new keys once ``known`` is full
        for _, _, values in batch.rows:
            for key in values:
                if key in known or key in unremembered:
                    continue
                new += 1
                if new > most:
                    raise ProtocolError(f"batch has more than {most} new metric keys", code=1008)
                self._check_new_key(key)
                if key not in known:
                    unremembered.add(key)

    def _check_new_key(self, key: str) -> None:
        problem = key_name_problem(key, self.max_key_length)
        if problem is not None:
            raise ProtocolError(problem, code=1008)
        if len(self._known_keys) < self.max_known_keys:
            self._known_keys.add(key)

    def run_opened(
        self, hello: Hello, last_seq: int, keys: Iterable[str] = (), *, new_run: bool = False
    ) -> None:
        """The run and stream named in ``hello`` are open in storage, holding batches
        up to ``last_seq``, and the metric ``keys`` (as this writer names them);
        ``new_run``: this hello created the run."""
        self._known_keys = set(keys)
        self.hello = hello
        self.run = hello.run
        self.last_seq = last_seq
        welcome = Welcome(
            v=PROTOCOL_VERSION, run_id=hello.run.id, last_seq=last_seq, new_run=new_run
        )
        self._replies.append(_encoder.encode(welcome))

    def committed(self, seq: int, refused: Iterable[str] = ()) -> None:
        """The batch (or finish) ``seq`` is durably stored, but for the values of the
        metric keys ``refused`` (past the run's key limit): acknowledge it, naming them."""
        self.last_seq = max(self.last_seq, seq)
        self._replies.append(_encoder.encode(Ack(seq=seq, refused=sorted(refused))))

    def frames_to_send(self) -> list[bytes]:
        frames, self._replies = self._replies, []
        return frames


_values_of: Final = operator.itemgetter(2)


def _rows_within(rows: list[Row], values: int) -> int:
    """How many of the first ``rows`` hold at most ``values`` values; at least one."""
    total = 0
    for n, row in enumerate(rows):
        total += len(row[2])
        if total > values:
            return max(n, 1)
    return len(rows)


def _decode(decoder: msgspec.msgpack.Decoder[T], data: bytes, what: str) -> T:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError for a string that is not UTF-8.
        raise ProtocolError(f"{what}: {exc}") from exc
    except RecursionError:
        raise ProtocolError(f"{what}: nested too deeply") from None
