"""The trainers' WebSocket endpoint: a thin shell around :class:`ServerSession`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from trainwire.exceptions import ProtocolError, StorageError
from trainwire.protocol.columns import series_from_rows, spelled
from trainwire.protocol.messages import Batch, Finish, Hello, Points, Row, encode_json
from trainwire.protocol.session import ServerSession
from trainwire.server.bus import Bus, PointsCommitted, RunChanged
from trainwire.server.fanout import Followers
from trainwire.server.limits import RateLimiter, client_address
from trainwire.server.watch import RunWatch
from trainwire.settings import Limits
from trainwire.storage import RunDeleted, Store

__all__ = ["RunUpdates", "serve_trainer"]

logger = logging.getLogger("trainwire.server")

# Work this large is done in the thread pool rather than on the event loop: decoding a
# 16 MiB frame took 0.35 s, and building the dashboards' frame of its points 1 s,
# during which every other trainer and dashboard waited. In a thread, the loop gets
# the GIL back every switch interval (5 ms). Smaller work stays on the loop, where a
# thread hop would cost more than it saves.
BIG_FRAME_BYTES: Final = 1 << 20
BIG_BATCH_VALUES: Final = 50_000


class RunUpdates:
    """Which commits to announce to the dashboards' run lists.

    Every commit moves its run's ``updated`` time; re-sending the run (``RunChanged``)
    on each would double the frames a dashboard gets. Once per ``interval`` seconds
    per run, whatever the number of its writers, keeps every run list's "last update
    n s ago" live without polling, at the cost of a dict lookup per commit. Time is
    a parameter.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._announced: dict[str, float] = {}  # run id -> when it was last announced
        self._prune_above = 1024

    def due(self, run_id: str, now: float) -> bool:
        """Whether a commit of ``run_id`` at ``now`` is announced; if so, it is
        recorded as the run's last announcement."""
        last = self._announced.get(run_id)
        if last is not None and now - last < self.interval:
            return False
        self.announced(run_id, now)
        return True

    def announced(self, run_id: str, now: float) -> None:
        """The run was just sent to dashboards (opened, finished, or a due commit)."""
        self._announced[run_id] = now
        if len(self._announced) > self._prune_above:
            # Runs announced longer ago than the interval are due anyway: forgetting
            # them changes no answer, and keeps the dict to the runs committing now.
            self._announced = {k: t for k, t in self._announced.items() if now - t < self.interval}
            self._prune_above = max(1024, 2 * len(self._announced))


async def serve_trainer(
    ws: WebSocket,
    store: Store,
    bus: Bus,
    watch: RunWatch,
    limits: Limits,
    new_runs: RateLimiter,
    followers: Followers | None = None,
    run_updates: RunUpdates | None = None,
) -> None:
    """Run one trainer connection until it closes.

    Every batch is committed before it is acknowledged and before dashboards hear
    of it, so an acknowledged point is always on disk and always replayable.
    ``run_updates`` is shared by every connection of the server (a fresh one per
    connection if omitted).
    """
    await ws.accept()
    session = ServerSession(
        max_rows_per_batch=limits.max_rows_per_batch,
        max_key_length=limits.max_key_length,
        max_known_keys=limits.max_series_per_run,
    )
    # Runs are rate-limited per token, or per address when authentication is off.
    principal = str(ws.scope.get("trainwire.principal") or client_address(ws.scope))
    context = _Context(
        store,
        bus,
        watch,
        new_runs,
        principal,
        followers,
        run_updates or RunUpdates(),
        limits.max_series_per_run,
    )
    try:
        await _serve(ws, session, context, limits.max_frame_bytes)
    finally:
        if session.hello is not None:
            context.watch.disconnected(session.hello.run.id, time.time(), session.hello.stream)


@dataclass
class _Context:
    store: Store
    bus: Bus
    watch: RunWatch
    new_runs: RateLimiter
    principal: str
    followers: Followers | None
    run_updates: RunUpdates
    max_keys: int  # metric keys per run (Limits.max_series_per_run)
    said_refused: bool = False  # the run's key limit, logged once per connection


async def _serve(
    ws: WebSocket, session: ServerSession, context: _Context, max_frame_bytes: int
) -> None:
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise ProtocolError("trainer frames must be binary msgpack, not text")
            if len(data) > max_frame_bytes:
                raise ProtocolError(f"frame of {len(data)} bytes exceeds {max_frame_bytes}", 1009)
            if len(data) > BIG_FRAME_BYTES:
                # Decoded off the event loop (this session is used by this task alone):
                # the loop then gets the GIL back every switch interval, and serves
                # every other trainer and dashboard meanwhile.
                decoded = await run_in_threadpool(session.receive_frame, data)
            else:
                decoded = session.receive_frame(data)
            await _handle(session, decoded, context)
            for frame in session.frames_to_send():
                await ws.send_bytes(frame)
    except ProtocolError as exc:
        logger.warning("closing trainer connection: %s", exc.reason)
        await ws.close(code=exc.code, reason=exc.reason)
    except RunDeleted:
        # An admin's DELETE, not a failure of the store: it was told as "server storage
        # error: no stream ...", an ERROR in the log. The writer reconnects, and its
        # hello opens the run anew, with what it sends from then on.
        run_id = _opened(session).run.id
        refusal = ProtocolError(
            f"run {run_id!r} was deleted; a writer that goes on opens it anew", code=4410
        )
        logger.info("closing trainer connection: %s", refusal.reason)
        await ws.close(code=refusal.code, reason=refusal.reason)
    except StorageError as exc:
        # A full disk, a file locked past the busy timeout: nothing the trainer did.
        # What was not acknowledged it sends again after its backoff, so close with
        # a reason (1011), rather than a traceback in the log and a bare drop.
        refusal = ProtocolError(f"server storage error: {exc}", code=1011)
        logger.error("closing trainer connection: %s (it will send again)", refusal.reason)
        await ws.close(code=refusal.code, reason=refusal.reason)
    except WebSocketDisconnect:
        return


async def _handle(
    session: ServerSession, message: Hello | Batch | Finish | None, context: _Context
) -> None:
    store, bus = context.store, context.bus
    match message:
        case None:
            return
        case Hello(run=spec, stream=stream, rank=rank):
            new_run = await run_in_threadpool(store.get_run, spec.id) is None
            if new_run and not context.new_runs.allow(context.principal, time.time(), spec.id):
                limit = context.new_runs.limit
                raise ProtocolError(f"more than {limit} new runs a minute", code=1008)
            # Connected before the stream is opened: the reaper, which checks the watch
            # again after marking a run crashed, then sees every trainer whose stream
            # its write could have caught (see reap_crashed_runs).
            context.watch.connected(spec.id, stream)
            try:
                last_seq = await run_in_threadpool(
                    store.open_run, spec, stream, time.time(), rank=rank, replay=message.replay
                )
                if message.resume:
                    # The script restarted: the writers it replaced are gone, and
                    # their streams must not leave the run running, then crashed,
                    # once this one finishes. Those connected now are kept (the
                    # ranks of a job restarting together).
                    keep = context.watch.streams(spec.id)
                    await run_in_threadpool(store.set_aside, spec.id, keep, time.time())
                keys = await run_in_threadpool(store.keys, spec.id)
            except BaseException:
                # serve_trainer disconnects only a session with an open run.
                context.watch.disconnected(spec.id, time.time(), stream)
                raise
            prefix = "" if rank is None else f"rank{rank}/"
            session.run_opened(
                message,
                last_seq,
                [k.removeprefix(prefix) for k in keys if k.startswith(prefix)],
                new_run=new_run,
            )
            run = await run_in_threadpool(store.get_run, spec.id)
            if run is not None:
                context.run_updates.announced(spec.id, time.monotonic())
                await bus.publish(RunChanged(run))
            logger.info("run %s stream %s opened (%s/%s)", spec.id, stream, spec.project, spec.name)
        case Batch():
            hello = _opened(session)
            run_id = hello.run.id
            # Ranks of one distributed job share the run; their keys stay apart.
            prefix = "" if hello.rank is None else f"rank{hello.rank}/"
            commit = await run_in_threadpool(
                store.append_batch,
                run_id,
                hello.stream,
                message,
                time.time(),
                prefix,
                context.max_keys,
            )
            # Keys past the run's limit: the rest of the batch is stored, and the writer
            # told which were not, so that it stops sending them. (Refusing the whole
            # batch held back every batch after it at every resend: a writer cannot
            # know the keys that the run's other ranks, or its earlier life, gave it.)
            # A resent batch already stored names none; later ones will.
            refused = () if commit is None else commit.refused
            session.committed(message.seq, refused)
            if refused and not context.said_refused:
                context.said_refused = True
                logger.warning(
                    "run %s has its most metric keys: values of new keys not stored (%s)",
                    run_id, ", ".join(map(repr, refused[:3])),
                )  # fmt: skip
            if commit is not None:
                rows = _without(message.rows, refused, prefix)
                frame = b""  # nobody follows the run here: see Followers
                if context.followers is None or run_id in context.followers:
                    if sum(len(values) for _, _, values in rows) > BIG_BATCH_VALUES:
                        frame = await run_in_threadpool(_points_frame, run_id, commit.seq, rows)
                    else:
                        frame = _points_frame(run_id, commit.seq, rows)
                await bus.publish(PointsCommitted(run_id, commit.prev_seq, commit.seq, frame))
                if context.run_updates.due(run_id, time.monotonic()):
                    run = await run_in_threadpool(store.get_run, run_id)
                    if run is not None:
                        await bus.publish(RunChanged(run))
        case Finish(seq=seq, status=status):
            hello = _opened(session)
            info = await run_in_threadpool(
                store.set_status, hello.run.id, hello.stream, status, seq, time.time()
            )
            session.committed(seq)
            if info is not None:
                context.run_updates.announced(hello.run.id, time.monotonic())
                await bus.publish(RunChanged(info))
                logger.info("run %s stream %s %s", hello.run.id, hello.stream, status)


def _without(rows: list[Row], refused: tuple[str, ...], prefix: str) -> list[Row]:
    """``rows`` as stored: keys under ``prefix``, those ``refused`` left out."""
    if not refused and not prefix:
        return rows
    left_out = set(refused)
    kept: list[Row] = []
    for step, at, values in rows:
        stored = {prefix + k: v for k, v in values.items() if k not in left_out}
        if stored:
            kept.append((step, at, stored))
    return kept


def _points_frame(run_id: str, seq: int, rows: list[Row]) -> bytes:
    """The dashboards' JSON frame of a committed batch."""
    return encode_json(Points(run=run_id, seq=seq, series=spelled(series_from_rows(rows))))


def _opened(session: ServerSession) -> Hello:
    # ServerSession refuses a batch or finish before hello: this is never None.
    assert session.hello is not None
    return session.hello
