"""The trainers' WebSocket endpoint: a thin shell around :class:`ServerSession`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from trainwire.exceptions import ProtocolError
from trainwire.protocol.columns import series_from_rows, spelled
from trainwire.protocol.messages import Batch, Finish, Hello, Points, encode_json
from trainwire.protocol.session import ServerSession
from trainwire.server.bus import Bus, PointsCommitted, RunChanged
from trainwire.server.fanout import Followers
from trainwire.server.limits import RateLimiter, client_address
from trainwire.server.watch import RunWatch
from trainwire.settings import Limits
from trainwire.storage import SeriesLimitExceeded, Store

__all__ = ["serve_trainer"]

logger = logging.getLogger("trainwire.server")


async def serve_trainer(
    ws: WebSocket,
    store: Store,
    bus: Bus,
    watch: RunWatch,
    limits: Limits,
    new_runs: RateLimiter,
    followers: Followers | None = None,
) -> None:
    """Run one trainer connection until it closes.

    Every batch is committed before it is acknowledged and before dashboards hear
    of it, so an acknowledged point is always on disk and always replayable.
    """
    await ws.accept()
    session = ServerSession(
        max_rows_per_batch=limits.max_rows_per_batch,
        max_key_length=limits.max_key_length,
        max_series_per_run=limits.max_series_per_run,
    )
    # Runs are rate-limited per token, or per address when authentication is off.
    principal = str(ws.scope.get("trainwire.principal") or client_address(ws.scope))
    context = _Context(store, bus, watch, new_runs, principal, followers)
    try:
        await _serve(ws, session, context, limits.max_frame_bytes)
    finally:
        if session.run is not None:
            context.watch.disconnected(session.run.id, time.time())


@dataclass
class _Context:
    store: Store
    bus: Bus
    watch: RunWatch
    new_runs: RateLimiter
    principal: str
    followers: Followers | None


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
            await _handle(session, session.receive_frame(data), context)
            for frame in session.frames_to_send():
                await ws.send_bytes(frame)
    except ProtocolError as exc:
        logger.warning("closing trainer connection: %s", exc.reason)
        await ws.close(code=exc.code, reason=exc.reason)
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
            if await run_in_threadpool(store.get_run, spec.id) is None and not (
                context.new_runs.allow(context.principal, time.time())
            ):
                limit = context.new_runs.limit
                raise ProtocolError(f"more than {limit} new runs a minute", code=1008)
            last_seq = await run_in_threadpool(store.open_run, spec, stream, time.time())
            prefix = "" if rank is None else f"rank{rank}/"
            keys = await run_in_threadpool(store.keys, spec.id)
            session.run_opened(
                message, last_seq, [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]
            )
            context.watch.connected(spec.id)
            run = await run_in_threadpool(store.get_run, spec.id)
            if run is not None:
                await bus.publish(RunChanged(run))
            logger.info("run %s stream %s opened (%s/%s)", spec.id, stream, spec.project, spec.name)
        case Batch():
            hello = _opened(session)
            run_id = hello.run.id
            # Ranks of one distributed job share the run; their keys stay apart.
            prefix = "" if hello.rank is None else f"rank{hello.rank}/"
            try:
                commit = await run_in_threadpool(
                    store.append_batch, run_id, hello.stream, message, time.time(), prefix
                )
            except SeriesLimitExceeded as exc:
                raise ProtocolError(str(exc), code=1008) from exc
            session.committed(message.seq)
            if commit is not None:
                rows = message.rows
                if prefix:
                    rows = [
                        (step, t, {prefix + k: v for k, v in vs.items()}) for step, t, vs in rows
                    ]
                frame = b""  # nobody follows the run here: see Followers
                if context.followers is None or run_id in context.followers:
                    series = spelled(series_from_rows(rows))
                    frame = encode_json(Points(run=run_id, seq=commit.seq, series=series))
                await bus.publish(PointsCommitted(run_id, commit.prev_seq, commit.seq, frame))
        case Finish(seq=seq, status=status):
            hello = _opened(session)
            info = await run_in_threadpool(
                store.set_status, hello.run.id, hello.stream, status, seq, time.time()
            )
            session.committed(seq)
            if info is not None:
                await bus.publish(RunChanged(info))
                logger.info("run %s stream %s %s", hello.run.id, hello.stream, status)


def _opened(session: ServerSession) -> Hello:
    # ServerSession refuses a batch or finish before hello: this is never None.
    assert session.hello is not None
    return session.hello
