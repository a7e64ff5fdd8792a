"""A run's file: the outbox's overflow while the server is unreachable, and the
whole run in offline mode.

Format: the magic line ``TWRUN1\\n``, then records, each a 4-byte little-endian
length and a msgpack body: first a :class:`RunHeader`, then the run's sequenced
items (``batch`` and ``finish`` frames, exactly as sent on the wire). Because the
items carry their stream and sequence numbers, uploading a file twice
(``trainwire sync``) stores nothing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
from collections import deque
from pathlib import Path
from typing import IO, Final

import msgspec

from trainwire.exceptions import ConfigError
from trainwire.protocol.messages import PROTOCOL_VERSION, Finish, RunSpec, Sequenced
from trainwire.settings import make_private_dir

__all__ = ["MAGIC", "RunHeader", "SpillingOutbox", "left_undelivered", "new_header"]

logger = logging.getLogger("trainwire.client")

MAGIC: Final = b"TWRUN1\n"
_LENGTH: Final = struct.Struct("<I")
_item_decoder: Final[msgspec.msgpack.Decoder[Sequenced]] = msgspec.msgpack.Decoder(Sequenced)
_encoder: Final = msgspec.msgpack.Encoder()
# The run's end is appended whatever the bound (it must never be dropped): the largest
# finish record is kept free.
_FINISH_ROOM: Final = _LENGTH.size + max(
    len(_encoder.encode(Finish(seq=2**63 - 1, status=status))) for status in ("finished", "crashed")
)
# Acknowledged bytes at the head of a spill file past which, once they also outweigh
# the records still unacknowledged, the file is rewritten without them (_compact).
_COMPACT_BYTES: Final = 4 << 20


class RunHeader(msgspec.Struct, frozen=True):
    """Who wrote a run file: enough to replay it as the same writer."""

    v: int
    run: RunSpec
    stream: str
    rank: int | None = None


class SpillingOutbox:
    """An outbox that keeps up to ``memory_rows`` rows in memory and the rest in a file.

    Items stay in order across the two: once one item went to the file, every later
    one does too, until the file is drained by acknowledgements. In offline mode
    (``keep=True``, ``memory_rows=0``) every item goes to the file and the file is
    kept.

    Args:
        path: the run file; created when first needed.
        header: written at the start of the file.
        memory_rows: rows kept in memory before spilling.
        disk_bytes: the file's size bound; :attr:`full` tells the caller to stop
            adding (it drops rows and counts them instead).
        keep: never truncate or delete the file.
    """

    def __init__(
        self,
        path: Path,
        header: RunHeader,
        *,
        memory_rows: int,
        disk_bytes: int,
        keep: bool = False,
    ) -> None:
        self.path = path
        self.header = header
        self.memory_rows = memory_rows
        self.disk_bytes = disk_bytes
        self.keep = keep
        self._memory: deque[Sequenced] = deque()
        # When each item in memory was added (time.monotonic): see held_since.
        self._memory_times: deque[float] = deque()
        self._memory_rows = 0
        # The bytes the items in memory will take in the file once persist() moves
        # them there; known (None: not yet counted) only while the file is in use.
        self._memory_bytes: int | None = None
        self._file: IO[bytes] | None = None
        self._data_start = 0
        self._index: deque[tuple[int, int, int, int]] = deque()  # seq, offset, size, rows
        self._disk_rows = 0
        self._last_encoded: tuple[Sequenced | None, bytes] = (None, b"")
        self.spilled = 0

    @classmethod
    def open_existing(cls, path: Path) -> SpillingOutbox:
        """A run file written earlier, every item in it still to be delivered.

        Raises:
            ConfigError: the file cannot be opened, or is not a trainwire run file.
        """
        # Unbuffered, as every handle the outbox appends to (see _open).
        handle, header = _open_ended(path, "r+b", buffering=0)
        outbox = cls(path, header, memory_rows=0, disk_bytes=1 << 62, keep=True)
        outbox._file = handle
        outbox._data_start = handle.tell()
        while True:
            offset = handle.tell()
            body = _read_record(handle)
            if body is None:
                break  # the end, or a record cut short by a crash: stop before it
            try:
                item = _item_decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # A tail a crash left zero-filled (or garbled): stop before it, as
                # before a record cut short.
                break
            if outbox._index and item.seq != outbox._index[-1][0] + 1:
                break
            outbox._index.append((item.seq, offset, len(body), item.row_count))
            outbox._disk_rows += item.row_count
        handle.seek(0, os.SEEK_END)
        return outbox

    @property
    def first_seq(self) -> int | None:
        if self._memory:
            return self._memory[0].seq
        return self._index[0][0] if self._index else None

    @property
    def last_seq(self) -> int | None:
        if self._index:
            return self._index[-1][0]
        return self._memory[-1].seq if self._memory else None

    # -- Outbox -----------------------------------------------------------------------

    def accepts(self, item: Sequenced) -> bool:
        if self._goes_to_memory(item):
            return True
        body = self._encoded(item)
        # Room is kept for the items still in memory: if the server never answers,
        # persist() writes them to the file too, and the bound must hold then.
        needed = self._held_bytes() + _LENGTH.size + len(body) + _FINISH_ROOM
        if self._file is None:  # the header comes first
            return len(MAGIC) + _LENGTH.size + len(_encoder.encode(self.header)) + needed <= (
                self.disk_bytes
            )
        size = self._file.seek(0, os.SEEK_END)
        acknowledged = self._acknowledged_bytes()
        if size + needed > self.disk_bytes and acknowledged >= max(
            needed, self._unacknowledged_bytes()
        ):
            # Full, and at least half of it records the server has: room is made by
            # dropping them. (Not for less: each rewrite copies every unacknowledged
            # byte, and a file at its bound was copied whole at every flush to free
            # one batch.)
            with contextlib.suppress(OSError):
                self._compact()
            size = self._file.seek(0, os.SEEK_END)
        return size + needed <= self.disk_bytes

    def _held_bytes(self) -> int:
        if self._memory_bytes is None:  # counted once per spill, then kept up to date
            self._memory_bytes = sum(_LENGTH.size + len(_encoder.encode(i)) for i in self._memory)
        return self._memory_bytes

    def append(self, item: Sequenced) -> None:
        if self._goes_to_memory(item):
            self._memory.append(item)
            self._memory_times.append(time.monotonic())
            self._memory_rows += item.row_count
            self._memory_bytes = None
            return
        self._write(item)

    def _write(self, item: Sequenced) -> None:
        handle = self._open()
        body = self._encoded(item)
        offset = handle.seek(0, os.SEEK_END)
        try:
            _write_all(handle, _LENGTH.pack(len(body)) + body)
        except BaseException:
            # Part of a record (a disk that filled mid-write) would hide every record
            # after it from open_existing(): cut it off, so a later append can succeed.
            with contextlib.suppress(OSError):
                handle.truncate(offset)
                handle.seek(offset)
            raise
        self._index.append((item.seq, offset, len(body), item.row_count))
        self._disk_rows += item.row_count
        self.spilled += 1

    def items(self, start_seq: int, limit: int) -> list[Sequenced]:
        found: list[Sequenced] = []
        if self._memory and limit > 0:
            first = max(0, start_seq - self._memory[0].seq)
            found = [self._memory[i] for i in range(first, min(len(self._memory), first + limit))]
            start_seq = max(start_seq, self._memory[-1].seq + 1)
        if self._index and len(found) < limit:
            assert self._file is not None
            first = max(0, start_seq - self._index[0][0])
            for i in range(first, min(len(self._index), first + limit - len(found))):
                _, offset, size, _ = self._index[i]
                self._file.seek(offset + _LENGTH.size)
                found.append(_item_decoder.decode(self._file.read(size)))
            self._file.seek(0, os.SEEK_END)
        return found

    def drop_through(self, seq: int) -> None:
        while self._memory and self._memory[0].seq <= seq:
            item = self._memory.popleft()
            self._memory_times.popleft()
            self._memory_rows -= item.row_count
            if self._memory_bytes is not None:
                self._memory_bytes -= _LENGTH.size + len(_encoder.encode(item))
        while self._index and self._index[0][0] <= seq:
            self._disk_rows -= self._index.popleft()[3]
        if self._file is None or self.keep:
            return
        if not self._index:
            # Drained: start the file over, so it never grows past one outage.
            self._file.truncate(self._data_start)
            self._file.seek(self._data_start)
            return
        # Once spilled, new items follow on disk until it drains; a loop that logs at
        # every flush always has its newest batch unacknowledged when acks are read,
        # so it might never drain: the file grew by everything logged after the
        # outage, up to max_disk_bytes, and new points were then dropped with the
        # server up. Its acknowledged head is cut off instead, once it is large.
        acknowledged = self._acknowledged_bytes()
        if acknowledged >= _COMPACT_BYTES and acknowledged >= self._unacknowledged_bytes():
            with contextlib.suppress(OSError):  # tried again at a later ack
                self._compact()

    def _acknowledged_bytes(self) -> int:
        """Bytes at the head of the file whose records the server has."""
        return self._index[0][1] - self._data_start if self._index else 0

    def _unacknowledged_bytes(self) -> int:
        if not self._index:
            return 0
        _, last_offset, last_size, _ = self._index[-1]
        return last_offset + _LENGTH.size + last_size - self._index[0][1]

    def _compact(self) -> None:
        """Rewrite the file with its unacknowledged records alone (_replace_file)."""
        self._replace_file([])

    def _replace_file(self, held: list[Sequenced]) -> None:
        """Replace the file by one holding ``held``, then its undelivered records, copied
        as bytes. Replaced while the old file is still open (POSIX): a failure up to
        the replacement leaves the old file whole, and is raised."""
        assert self._file is not None and self._index
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            data_start, index = self._rewrite(held, partial)
            os.replace(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self._file.close()
        self._file = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - see _open
        self._lock_spill(self._file)
        self._file.seek(0, os.SEEK_END)
        self._data_start = data_start
        self._index = index

    def _goes_to_memory(self, item: Sequenced) -> bool:
        # memory_rows == 0 (offline, or persisting): everything to the file, the run's
        # Finish (no rows) included, or a run whose only item left is its end keeps
        # no file and loses its status.
        return (
            not self._index
            and self.memory_rows > 0
            and self._memory_rows + item.row_count <= self.memory_rows
        )

    def _encoded(self, item: Sequenced) -> bytes:
        # accepts() and append() see the same item in turn: encode it once.
        if self._last_encoded[0] is not item:
            self._last_encoded = (item, _encoder.encode(item))
        return self._last_encoded[1]

    @property
    def rows(self) -> int:
        return self._memory_rows + self._disk_rows

    def __len__(self) -> int:
        return len(self._memory) + len(self._index)

    # -- bounds and lifetime ------------------------------------------------------------

    @property
    def spilling(self) -> bool:
        return bool(self._index)

    def persist(self) -> None:
        """Write every undelivered item to the file, oldest first, and keep it: the
        process is ending with the server unreachable (or refusing), and what was
        held in memory would be lost otherwise.

        The items in memory are older than those on disk, so they must come first.
        With nothing undelivered on disk they are simply appended. Otherwise a new
        file is written beside the old one and then replaces it. It gets the items
        from memory, then the undelivered records from disk, copied as bytes and
        never decoded: a file near its bound holds millions of rows, which, decoded,
        took about eight times the file's size in memory.
        """
        self.keep = True
        if not self._memory:
            return
        held, held_rows, times = list(self._memory), self._memory_rows, list(self._memory_times)
        self._memory.clear()
        self._memory_times.clear()
        self._memory_rows = 0
        self._memory_bytes = None
        self.memory_rows = 0  # from now on, everything goes to the file
        if not self._index:
            if self._file is not None:
                self._file.truncate(self._data_start)
            for written, item in enumerate(held):
                try:
                    self.append(item)
                except BaseException:  # those not written stay held, to be counted
                    self._memory.extend(held[written:])
                    self._memory_times.extend(times[written:])
                    self._memory_rows = sum(i.row_count for i in self._memory)
                    raise
            return
        try:
            self._replace_file(held)
        except BaseException:  # the old file is whole: the items go back to memory
            self._memory.extend(held)
            self._memory_times.extend(times)
            self._memory_rows = held_rows
            raise
        self._disk_rows += held_rows
        self.spilled += len(held)

    @property
    def held_since(self) -> float | None:
        """When the oldest item still held in memory was added (``time.monotonic``);
        None if none is."""
        return self._memory_times[0] if self._memory_times else None

    def spill_held(self) -> None:
        """Move the items held in memory to the file, and every later item with them,
        until the server has acknowledged the file's last (then it starts over, as after
        a spill past the memory bound). The sender calls it once items have waited too
        long for the server (Sender._spill_stale): held in memory, they die with the
        process (a job preempted, killed for its memory) while the server is away.

        All or nothing: on a failure (raised) the items stay in memory and the file is
        as it was, since an item in memory must never be newer than one on disk.
        """
        if not self._memory:
            return
        held, held_rows = list(self._memory), self._memory_rows
        if self._index:  # memory holds the older items: a new file, them first
            self._replace_file(held)
            self._disk_rows += held_rows
        else:
            handle = self._open()
            handle.truncate(self._data_start)  # nothing undelivered on disk: acknowledged only
            offset = handle.seek(0, os.SEEK_END)
            bodies = [_encoder.encode(item) for item in held]
            try:  # one write: a failure leaves nothing half-moved
                _write_all(handle, b"".join(_LENGTH.pack(len(b)) + b for b in bodies))
            except BaseException:
                with contextlib.suppress(OSError):
                    handle.truncate(offset)
                    handle.seek(offset)
                raise
            for item, body in zip(held, bodies, strict=True):
                self._index.append((item.seq, offset, len(body), item.row_count))
                offset += _LENGTH.size + len(body)
            self._disk_rows += held_rows
        self._memory.clear()
        self._memory_times.clear()
        self._memory_rows = 0
        self._memory_bytes = None
        self.spilled += len(held)

    def forget_held(self) -> int:
        """Forget the items held in memory (persist() could not write them); returns
        their rows. They end with the sender, and must be counted as dropped rather
        than said to be in the file."""
        rows = self._memory_rows
        self._memory.clear()
        self._memory_times.clear()
        self._memory_rows = 0
        self._memory_bytes = None
        return rows

    def _rewrite(
        self, held: list[Sequenced], path: Path
    ) -> tuple[int, deque[tuple[int, int, int, int]]]:
        """Write ``held``, then the undelivered records on disk, to a new file at
        ``path``; returns where its items start and its index."""
        assert self._file is not None
        start = self._index[0][1]
        _, last_offset, last_size, _ = self._index[-1]
        index: deque[tuple[int, int, int, int]] = deque()
        with _create_private(path, os.O_WRONLY, "wb") as new:
            data_start = self._write_header(new)
            for item in held:
                body = _encoder.encode(item)
                index.append((item.seq, new.tell(), len(body), item.row_count))
                new.write(_LENGTH.pack(len(body)) + body)
            shift = new.tell() - start
            self._file.seek(start)
            left = last_offset + _LENGTH.size + last_size - start
            while left > 0:
                chunk = self._file.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{self.path} ended before its last record")
                new.write(chunk)
                left -= len(chunk)
            new.flush()
            os.fsync(new.fileno())  # on disk before it replaces the old file
        self._file.seek(0, os.SEEK_END)
        index.extend((seq, offset + shift, size, rows) for seq, offset, size, rows in self._index)
        return data_start, index

    def close(self) -> None:
        """Close the file; delete it if it holds nothing undelivered (and not ``keep``)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self.keep and not self._index:
            self.path.unlink(missing_ok=True)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            make_private_dir(self.path.parent)
            # Unbuffered: a write that fails leaves nothing behind in a buffer, to be
            # written later after other records (each record is one write anyway).
            handle = _create_private(self.path, os.O_RDWR, "w+b", buffering=0)
            try:
                self._data_start = self._write_header(handle)
            except BaseException:
                handle.close()
                self.path.unlink(missing_ok=True)  # made again, whole, next time
                raise
            self._lock_spill(handle)
            self._file = handle
            if self.keep:
                logger.info("trainwire: writing run to %s", self.path)
        return self._file

    def _lock_spill(self, handle: IO[bytes]) -> None:
        """Keep ``trainwire sync`` off a spill file while this process writes it (see
        open_existing). Not an offline run's file, nor one persist() wrote: they hold
        every row in order, and syncing them as they grow is safe. Released when the
        file is closed, or the process dies."""
        if self.keep:
            return
        with contextlib.suppress(OSError):  # a file system without locks: as before
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _write_header(self, handle: IO[bytes]) -> int:
        """The magic line and the header, at the start of a new file; returns where
        the items start."""
        header = _encoder.encode(self.header)
        _write_all(handle, MAGIC + _LENGTH.pack(len(header)) + header)
        return handle.tell()


def _create_private(path: Path, access: int, mode: str, buffering: int = -1) -> IO[bytes]:
    """``path`` created (or emptied), readable by its owner alone: a run
    file holds the run's metrics and config, in a data directory that may be open to
    others (one the user made, or made before trainwire kept it private)."""
    fd = os.open(path, access | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return open(fd, mode, buffering=buffering)  # noqa: SIM115 - the caller's to close
    except BaseException:
        os.close(fd)
        raise


def _write_all(handle: IO[bytes], data: bytes) -> None:
    """Write all of ``data``: an unbuffered file may take part of it per call."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:  # a regular file fails with an error rather than take nothing
            raise OSError(f"write made no progress ({len(view)} bytes left)")
        view = view[written:]


def _read_record(handle: IO[bytes]) -> bytes | None:
    prefix = handle.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(prefix)
    body = handle.read(size)
    return body if len(body) == size else None


def new_header(run: RunSpec, stream: str, rank: int | None) -> RunHeader:
    return RunHeader(v=PROTOCOL_VERSION, run=run, stream=stream, rank=rank)


def left_undelivered(folder: Path, rank: int | None) -> list[Path]:
    """The run files in ``folder`` (a run's, ``runs/RUN_ID``) that an ended process of
    rank ``rank`` left with items in them: a trainer killed while the server was away,
    or one whose ``finish()`` ran out of time. Not those a running trainer still
    writes (locked: it delivers them itself), nor other ranks' (each rank of a
    restarted job says its own). Reads only each file's header."""
    found = []
    for path in sorted(folder.glob("*.twrun")):
        try:
            handle, header = _open_ended(path, "rb")
        except ConfigError:  # a running trainer's, or unreadable: `trainwire sync` says
            continue
        with handle, contextlib.suppress(OSError):
            if header.rank == rank and handle.read(1):  # an item after the header
                found.append(path)
    return found


def _open_ended(path: Path, mode: str, buffering: int = -1) -> tuple[IO[bytes], RunHeader]:
    """``path`` opened with a shared lock, read past its magic line and header.

    Raises:
        ConfigError: it cannot be opened, a running trainer still writes it, or it is
            not a trainwire run file.
    """
    try:
        handle = open(path, mode, buffering=buffering)  # noqa: SIM115 - the caller's to close
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        # A running trainer's spill file holds rows newer than those it still has in
        # memory: uploaded first, they moved the stream past the older ones, which the
        # server then took for resends and the trainer dropped as delivered. That
        # trainer delivers its file itself (see _lock_spill).
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{path} is being written by a running trainer, which delivers it "
                "itself: sync it once that trainer has ended"
            ) from None
        except OSError:  # a file system without locks (some NFS): as before
            pass
        if handle.read(len(MAGIC)) != MAGIC:
            raise ConfigError(f"{path} is not a trainwire run file")
        header = msgspec.msgpack.decode(_read_record(handle) or b"", type=RunHeader)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        handle.close()
        raise ConfigError(f"{path}: unreadable header: {exc}") from exc
    except OSError as exc:  # a read that failed (EIO)
        handle.close()
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except BaseException:
        handle.close()
        raise
    return handle, header
