"""The trainers' WebSocket endpoint: a thin shell around :class:`ServerSession`."""

from __future__ import annotations

import logging
import time

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from trainwire.exceptions import ProtocolError
from trainwire.protocol.columns import series_from_rows, spelled
from trainwire.protocol.messages import Batch, Finish, Hello, Points, encode_json
from trainwire.protocol.session import ServerSession
from trainwire.server.bus import Bus, PointsCommitted, RunChanged
from trainwire.storage import Store

__all__ = ["serve_trainer"]

logger = logging.getLogger("trainwire.server")


async def serve_trainer(ws: WebSocket, store: Store, bus: Bus, max_frame_bytes: int) -> None:
    """Run one trainer connection until it closes.

    Every batch is committed before it is acknowledged and before dashboards hear
    of it, so an acknowledged point is always on disk and always replayable.
    """
    await ws.accept()
    session = ServerSession()
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
            await _handle(session, session.receive_frame(data), store, bus)
            for frame in session.frames_to_send():
                await ws.send_bytes(frame)
    except ProtocolError as exc:
        logger.warning("closing trainer connection: %s", exc.reason)
        await ws.close(code=exc.code, reason=exc.reason)
    except WebSocketDisconnect:
        return


async def _handle(
    session: ServerSession, message: Hello | Batch | Finish | None, store: Store, bus: Bus
) -> None:
    match message:
        case None:
            return
        case Hello(run=spec):
            last_seq = await run_in_threadpool(store.open_run, spec, time.time())
            session.run_opened(spec, last_seq)
            run = await run_in_threadpool(store.get_run, spec.id)
            if run is not None:
                await bus.publish(RunChanged(run))
            logger.info("run %s opened (%s/%s)", spec.id, spec.project, spec.name)
        case Batch():
            assert session.run is not None  # ServerSession refuses a batch before hello
            run_id = session.run.id
            commit = await run_in_threadpool(store.append_batch, run_id, message, time.time())
            session.committed(message.seq)
            if commit is not None:
                frame = encode_json(
                    Points(
                        run=run_id, seq=commit.seq, series=spelled(series_from_rows(message.rows))
                    )
                )
                await bus.publish(PointsCommitted(run_id, commit.prev_seq, commit.seq, frame))
        case Finish(seq=seq, status=status):
            assert session.run is not None
            run_id = session.run.id
            info = await run_in_threadpool(store.set_status, run_id, status, seq, time.time())
            session.committed(seq)
            if info is not None:
                await bus.publish(RunChanged(info))
                logger.info("run %s %s", run_id, status)
