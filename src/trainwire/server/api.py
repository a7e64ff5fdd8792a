"""The REST API, described by OpenAPI at ``/openapi.json``.

Responses are encoded by msgspec (fast, and it spells NaN and ±Infinity the way
the protocol says); the pydantic models below exist to describe them in OpenAPI.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trainwire import __version__
from trainwire.protocol.columns import spelled
from trainwire.protocol.messages import PROTOCOL_VERSION, RunInfo
from trainwire.server.bus import Bus, RunChanged
from trainwire.storage import Store

__all__ = ["router"]

router = APIRouter(prefix="/api")


class HealthModel(BaseModel):
    app: str
    version: str
    protocol: int


class RunModel(BaseModel):
    id: str
    project: str
    name: str
    status: str
    created: float
    updated: float
    config: dict[str, Any]


class RunDetailModel(RunModel):
    keys: list[str]


class SeriesModel(BaseModel):
    step: list[int]
    time: list[float]
    value: list[float | str]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _json(content: Any) -> Response:
    return Response(msgspec.json.encode(content), media_type="application/json")


@router.get("/health", response_model=HealthModel, summary="Is a trainwire server here?")
async def health() -> Response:
    return _json({"app": "trainwire", "version": __version__, "protocol": PROTOCOL_VERSION})


@router.get("/runs", response_model=list[RunModel], summary="Every run, newest first")
async def list_runs(request: Request) -> Response:
    return _json(await run_in_threadpool(_store(request).list_runs))


@router.get(
    "/runs/{run_id}",
    response_model=RunDetailModel,
    responses={404: {"description": "No such run"}},
    summary="One run, with the keys of its metrics",
)
async def get_run(request: Request, run_id: str) -> Response:
    store = _store(request)
    run = await run_in_threadpool(store.get_run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    keys = await run_in_threadpool(store.keys, run_id)
    return _json({**msgspec.structs.asdict(run), "keys": keys})


@router.get(
    "/runs/{run_id}/metrics",
    response_model=dict[str, SeriesModel],
    responses={404: {"description": "No such run"}},
    summary="A run's points, per metric key, in columns",
    description=(
        "Per key: arrays `step`, `time` (Unix seconds) and `value`, in logging order. "
        'NaN and ±Infinity are sent as the strings "NaN", "Infinity" and "-Infinity".'
    ),
)
async def get_metrics(
    request: Request,
    run_id: str,
    keys: str | None = Query(None, description="Comma-separated metric keys; all if omitted"),
) -> Response:
    store = _store(request)
    if await run_in_threadpool(store.get_run, run_id) is None:
        raise HTTPException(404, f"no run {run_id!r}")
    wanted = [k for k in keys.split(",") if k] if keys else None
    _, series = await run_in_threadpool(store.metrics, run_id, wanted, 0)
    return _json(spelled(series))


@router.delete(
    "/runs/{run_id}",
    status_code=204,
    responses={404: {"description": "No such run"}, 403: {"description": "Needs admin scope"}},
    summary="Delete a run and its points (admin scope)",
)
async def delete_run(request: Request, run_id: str) -> Response:
    store = _store(request)
    if not await run_in_threadpool(store.delete_run, run_id):
        raise HTTPException(404, f"no run {run_id!r}")
    bus: Bus = request.app.state.bus
    await bus.publish(RunChanged(RunInfo(run_id, "", "", "deleted", 0.0, time.time(), {})))
    return Response(status_code=204)
