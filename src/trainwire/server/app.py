"""The app factory: one port for the dashboard, both WebSocket endpoints and the API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket
from starlette.staticfiles import StaticFiles

from trainwire import __version__
from trainwire.server.api import router
from trainwire.server.bus import Bus, MemoryBus
from trainwire.server.fanout import serve_dashboard
from trainwire.server.ingest import serve_trainer
from trainwire.settings import Settings
from trainwire.storage import SQLiteStore, Store

__all__ = ["create_app"]


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

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store if store is not None else SQLiteStore(settings.db_path)
        app.state.bus = bus if bus is not None else MemoryBus()
        try:
            yield
        finally:
            await app.state.bus.close()
            app.state.store.close()

    app = FastAPI(
        title="trainwire",
        version=__version__,
        summary="Live training metrics over WebSockets.",
        lifespan=lifespan,
    )
    app.include_router(router)

    @app.websocket("/ws/ingest")
    async def ingest(ws: WebSocket) -> None:
        await serve_trainer(ws, app.state.store, app.state.bus, settings.max_frame_bytes)

    @app.websocket("/ws/dashboard")
    async def dashboard(ws: WebSocket) -> None:
        await serve_dashboard(
            ws, app.state.store, app.state.bus, __version__, settings.dashboard_queue
        )

    # Last, so that it never shadows the API: the dashboard ships inside the package.
    app.mount("/", StaticFiles(packages=[("trainwire", "dashboard")], html=True), name="dashboard")
    return app
