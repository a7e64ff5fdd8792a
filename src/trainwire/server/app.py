"""The app factory: one port for the dashboard, both WebSocket endpoints and the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect

from trainwire import __version__
from trainwire.exceptions import ProtocolError, StorageError
from trainwire.server.api import router
from trainwire.server.auth import Authenticator, AuthMiddleware, SecurityHeadersMiddleware
from trainwire.server.bus import Bus, MemoryBus, RunChanged
from trainwire.server.fanout import Followers, serve_dashboard
from trainwire.server.ingest import RunUpdates, serve_trainer
from trainwire.server.limits import ConnectionLimitMiddleware, RateLimiter
from trainwire.server.watch import RunWatch
from trainwire.settings import Settings
from trainwire.storage import SQLiteStore, Store
from trainwire.storage.tokens import TokenStore

__all__ = ["create_app", "reap_crashed_runs"]

logger = logging.getLogger("trainwire.server")


async def reap_crashed_runs(store: Store, bus: Bus, watch: RunWatch) -> None:
    """Mark ``crashed`` every run whose trainers vanished without finishing."""
    while True:
        await asyncio.sleep(watch.timeout / 4)  # a period, not a wait for an event
        # One task for the server's whole life: an error (a file locked by another
        # process past the busy timeout, a full disk) is said and tried again next
        # period, or every trainer that vanished later would leave its run "running".
        try:
            await _reap_once(store, bus, watch)
        except StorageError as exc:
            logger.error("looking for crashed runs failed (%s); trying again", exc)
        except Exception:
            logger.exception("looking for crashed runs failed; trying again")


async def _reap_once(store: Store, bus: Bus, watch: RunWatch) -> None:
    """Mark ``crashed`` the runs overdue now."""
    running = await run_in_threadpool(store.running_runs)
    for run_id in watch.overdue(running, time.time()):
        info = await run_in_threadpool(store.mark_crashed, run_id, time.time())
        if not watch.overdue([run_id], time.time()):
            # A trainer said hello while mark_crashed ran in its thread, and the
            # write may have caught the stream it opened: undone, as if the hello
            # had come first. Ingest counts a trainer connected before it opens
            # the stream, so no such hello goes unseen here. (Cheaper than a lock
            # that would queue every hello behind the reaper: a second write, only
            # in this race.)
            info = await run_in_threadpool(store.revive, run_id, time.time())
        else:
            watch.forget(run_id)
            if info is not None:
                logger.warning("run %s crashed: no trainer for %g s", run_id, watch.timeout)
        if info is not None:
            await bus.publish(RunChanged(info))


async def _storage_unavailable(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    """A REST read the store failed (a disk error, the file locked past the busy
    timeout): 503, which says "try again", with the reason, and one line in the log
    instead of a 500 and a traceback. The dashboard retries its reads.

    Starlette hands a WebSocket endpoint's exceptions here too (a dashboard whose
    list of runs cannot be read): that socket is closed 1011 with the reason."""
    reason = f"storage error: {exc}"
    if isinstance(conn, WebSocket):
        refusal = ProtocolError(f"server {reason}", code=1011)
        logger.error("%s: closing connection: %s", conn.url.path, refusal.reason)
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):  # closed meanwhile
            await conn.close(code=refusal.code, reason=refusal.reason)
        return None
    method = conn.scope.get("method", "")
    logger.error("%s %s: %s", method, conn.url.path, reason)
    return JSONResponse({"detail": reason}, status_code=503)


def create_app(
    settings: Settings, *, store: Store | None = None, bus: Bus | None = None
) -> FastAPI:
    """Build the trainwire ASGI app.

    Args:
        settings: where data lives, and limits.
        store: storage to use instead of ``SQLiteStore(settings.db_path)``.
        bus: the bus to use instead of a fresh :class:`MemoryBus`.

    The store and bus are opened and closed by the app's lifespan.
    """

    authenticator = Authenticator(admin_token=settings.token, enabled=settings.auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store if store is not None else SQLiteStore(settings.db_path)
        app.state.bus = bus if bus is not None else MemoryBus()
        tokens = TokenStore(settings.db_path)
        authenticator.lookup = tokens.scope_of
        app.state.watch = RunWatch(settings.heartbeat_timeout, time.time())
        reaper = asyncio.create_task(
            reap_crashed_runs(app.state.store, app.state.bus, app.state.watch)
        )
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await app.state.bus.close()
            app.state.store.close()
            authenticator.lookup = None
            tokens.close()

    app = FastAPI(
        title="trainwire",
        version=__version__,
        summary="Live training metrics over WebSockets.",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their scripts from a CDN: no use on an
        # offline cluster, and against our Content-Security-Policy. /openapi.json stays.
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(router)
    app.add_exception_handler(StorageError, _storage_unavailable)  # type: ignore[arg-type]  # HTTP and WebSocket both
    new_runs = RateLimiter(settings.limits.max_new_runs_per_minute)
    followers = Followers()
    run_updates = RunUpdates(settings.run_update_interval)

    @app.websocket("/ws/ingest")
    async def ingest(ws: WebSocket) -> None:
        await serve_trainer(
            ws,
            app.state.store,
            app.state.bus,
            app.state.watch,
            settings.limits,
            new_runs,
            followers,
            run_updates,
        )

    @app.websocket("/ws/dashboard")
    async def dashboard(ws: WebSocket) -> None:
        await serve_dashboard(
            ws, app.state.store, app.state.bus, __version__, settings.dashboard_queue, followers
        )

    # Last, so that it never shadows the API: the dashboard ships inside the package.
    app.mount("/", StaticFiles(packages=[("trainwire", "dashboard")], html=True), name="dashboard")
    # Outermost first: headers on every answer, refusals included; then the
    # connection cap, then authentication.
    app.add_middleware(
        AuthMiddleware,
        authenticator=authenticator,
        allowed_origins=settings.allowed_origins,
        secure_cookie=settings.tls,
    )
    app.add_middleware(ConnectionLimitMiddleware, limit=settings.limits.max_connections_per_address)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
