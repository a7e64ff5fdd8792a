"""The REST API, described by OpenAPI at ``/openapi.json``.

Responses are encoded by msgspec (fast, and it spells NaN and ±Infinity the way
the protocol says); the pydantic models below exist to describe them in OpenAPI.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Final

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trainwire import __version__
from trainwire.exceptions import StorageError
from trainwire.protocol.columns import spelled
from trainwire.protocol.messages import PROTOCOL_VERSION, RunInfo, json_value
from trainwire.server.bus import Bus, RunChanged
from trainwire.storage import SampledSeries, SeriesSummary, Store

logger = logging.getLogger("trainwire.server")

__all__ = ["router"]

router = APIRouter(prefix="/api")

# Steps are stored as SQLite integers: signed 64-bit.
_STEP_MIN: Final = -(2**63)
_STEP_MAX: Final = 2**63 - 1
_MAX_POINTS: Final = 100_000


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
    env: dict[str, Any]


class SummaryModel(BaseModel):
    count: int
    last: float | str
    last_step: int
    min: float | None
    max: float | None


class RunDetailModel(RunModel):
    keys: list[str]
    summary: dict[str, SummaryModel]


class SampledSeriesModel(BaseModel):
    step: list[int]
    time: list[float]
    value: list[float | str]
    sampled: bool


class MetricsModel(BaseModel):
    run: str
    seq: int
    series: dict[str, SampledSeriesModel]


class CSVResponse(StreamingResponse):
    media_type = "text/csv"


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
    content = await run_in_threadpool(_store(request).runs_json)
    return Response(content, media_type="application/json")


@router.get(
    "/runs/{run_id}",
    response_model=RunDetailModel,
    responses={404: {"description": "No such run"}},
    summary="One run, with its metric keys, a summary of each, and its environment",
    description=(
        "`summary`, per key: `count` (points), `last` and `last_step` (the last point "
        "logged), `min` and `max` (of its finite values; null when it has none). `env`: "
        "where the run was started (host, OS, Python, command line, pid, torch and CUDA "
        "versions, GPUs), as its first trainer reported it; `{}` from older clients."
    ),
)
async def get_run(request: Request, run_id: str) -> Response:
    store = _store(request)

    def read() -> tuple[RunInfo | None, list[str], dict[str, SeriesSummary]]:
        return store.get_run(run_id), store.keys(run_id), store.summary(run_id)

    run, keys, summary = await run_in_threadpool(read)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return _json(
        {
            **msgspec.structs.asdict(run),
            "keys": keys,
            "summary": {
                key: {
                    "count": s.count,
                    "last": json_value(s.last),
                    "last_step": s.last_step,
                    "min": s.min,
                    "max": s.max,
                }
                for key, s in summary.items()
            },
        }
    )


@router.get(
    "/runs/{run_id}/metrics",
    response_model=MetricsModel,
    responses={404: {"description": "No such run"}},
    summary="A run's points, per metric key, in columns sorted by step; downsampled on request",
    description=(
        "`series`, per key: arrays `step`, `time` (Unix seconds) and `value`, sorted by "
        "step (points of one step in logging order), and `sampled`: whether they were "
        "downsampled. With `points=N` a series of more than N points in the range is "
        "cut into N/2 equal step buckets, each keeping its lowest and highest point, "
        "so no spike is lost (NaN is ignored, except where a bucket holds nothing "
        "else). `seq` is the run's commit number at the read: subscribe on "
        "`/ws/dashboard` with `after` set to it to get exactly the later points. "
        'NaN and ±Infinity are sent as the strings "NaN", "Infinity" and "-Infinity".'
    ),
)
async def get_metrics(
    request: Request,
    run_id: str,
    keys: str | None = Query(None, description="Comma-separated metric keys; all if omitted"),
    points: int | None = Query(
        None,
        ge=2,
        le=_MAX_POINTS,
        description="At most this many points per key, downsampled; every point if omitted",
    ),
    start: int | None = Query(
        None, ge=_STEP_MIN, le=_STEP_MAX, description="The first step (inclusive)"
    ),
    end: int | None = Query(None, ge=_STEP_MIN, le=_STEP_MAX, description="The last step"),
) -> Response:
    if start is not None and end is not None and start > end:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "end"),
                    "msg": f"end ({end}) must not be less than start ({start})",
                    "input": str(end),
                }
            ]
        )
    store = _store(request)
    if await run_in_threadpool(store.get_run, run_id) is None:
        raise HTTPException(404, f"no run {run_id!r}")
    wanted = [k for k in keys.split(",") if k] if keys else None
    seq, series = await run_in_threadpool(store.history, run_id, wanted, start, end, points)
    if sum(len(s.step) for s in series.values()) <= STREAM_VALUES:
        return _json({"run": run_id, "seq": seq, "series": spelled(series)})
    # Every point of a long run: tens of megabytes of JSON. Encoded as one call, it
    # held the GIL, and so every trainer and dashboard, for about half a second per
    # 3,000,000 points; in blocks, from the thread pool, it holds it 10 ms at a time.
    return StreamingResponse(_streamed_json(run_id, seq, series), media_type="application/json")


# Values above which a metrics answer is streamed in blocks of this many (see above).
STREAM_VALUES: Final = 50_000
# The least a streamed block holds (but the last): about what STREAM_VALUES values
# encode to. Each block is a hop to the thread pool and a write to the socket: one
# per key and column, a 400-key run's answer (30 MB) took 4,400 of them, and 1.9 s
# instead of 0.8 s.
STREAM_BYTES: Final = 1 << 20


def _streamed_json(run_id: str, seq: int, series: dict[str, SampledSeries]) -> Iterator[bytes]:
    """What a streamed metrics answer sends: :func:`_json_blocks` in blocks of at
    least STREAM_BYTES."""
    return _coalesced(_json_blocks(run_id, seq, series), STREAM_BYTES)


def _coalesced(pieces: Iterable[bytes], at_least: int) -> Iterator[bytes]:
    """``pieces`` joined into blocks of at least ``at_least`` bytes (the last may be
    smaller), in order."""
    pending: list[bytes] = []
    size = 0
    for piece in pieces:
        pending.append(piece)
        size += len(piece)
        if size >= at_least:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def _json_blocks(run_id: str, seq: int, series: dict[str, SampledSeries]) -> Iterator[bytes]:
    """``{"run", "seq", "series"}`` as :func:`_json` encodes it, a piece at a time
    (a column's values in pieces of STREAM_VALUES)."""
    encode = msgspec.json.encode
    yield b'{"run":' + encode(run_id) + b',"seq":' + encode(seq) + b',"series":{'
    for index, (key, entry) in enumerate(series.items()):
        spelled({key: entry})
        yield (b"," if index else b"") + encode(key) + b":{"
        for name, column in (("step", entry.step), ("time", entry.time), ("value", entry.value)):
            yield b'"' + name.encode() + b'":['
            for first in range(0, len(column), STREAM_VALUES):
                block = encode(column[first : first + STREAM_VALUES])[1:-1]
                yield (b"," if first else b"") + block
            yield b"],"
        yield b'"sampled":' + encode(entry.sampled) + b"}"
    yield b"}}"


@router.get(
    "/runs/{run_id}/csv",
    response_class=CSVResponse,
    responses={
        200: {"description": "`step,time,value`, one line per point, sorted by step"},
        404: {"description": "No such run, or no such metric in it"},
    },
    summary="One metric of a run, every point, as a CSV file",
)
async def get_csv(
    request: Request,
    run_id: str,
    key: str = Query(description="The metric key"),
) -> Response:
    store = _store(request)
    run = await run_in_threadpool(store.get_run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    _, series = await run_in_threadpool(store.history, run_id, [key])
    found = series.get(key)
    if found is None:
        raise HTTPException(404, f"no metric {key!r} in run {run_id!r}")
    filename = f"{_safe_name(run.name, 'run')}-{_safe_name(key, 'metric')}.csv"
    return CSVResponse(
        _csv_lines(found), headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


def _csv_lines(series: SampledSeries) -> Iterator[bytes]:
    """The CSV, a block of lines at a time: a million points are tens of megabytes
    (Starlette runs this in its thread pool).

    Numbers are spelled as the JSON API spells them (the shortest text that reads
    back as the same float; NaN and ±Infinity as words), by msgspec a column at a
    time: a Python format per value took 11 s for 3,000,000 points, and held the
    GIL, and every trainer and dashboard with it, for most of that; this takes 1.2 s.
    """
    spelled({"": series})  # NaN and ±Infinity as strings: encoded quoted, unquoted below
    encode = msgspec.json.encode
    yield b"step,time,value\n"
    for first in range(0, len(series.step), _CSV_LINES):
        block = slice(first, first + _CSV_LINES)
        steps = encode(series.step[block])[1:-1].split(b",")
        times = encode(series.time[block])[1:-1].split(b",")
        # Numbers and those words only: no comma, nothing to quote.
        values = encode(series.value[block])[1:-1].replace(b'"', b"").split(b",")
        yield b"\n".join(map(b",".join, zip(steps, times, values, strict=True))) + b"\n"


_CSV_LINES: Final = 10_000


def _safe_name(text: str, fallback: str) -> str:
    # A file name every system accepts, and no header injection: [A-Za-z0-9._-] only,
    # never hidden (leading dot).
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")[:100]
    return safe or fallback


@router.delete(
    "/runs/{run_id}",
    status_code=204,
    responses={404: {"description": "No such run"}, 403: {"description": "Needs admin scope"}},
    summary="Delete a run and its points (admin scope)",
)
async def delete_run(request: Request, run_id: str) -> Response:
    store = _store(request)
    if not await run_in_threadpool(store.detach_run, run_id):
        raise HTTPException(404, f"no run {run_id!r}")
    # Told before the points go, not after: that takes seconds for a big run, and its
    # writer, closed 4410 at its next batch, reconnects within 0.1 s and opens the run
    # anew. Told after, every dashboard dropped the run its writer had just made.
    bus: Bus = request.app.state.bus
    await bus.publish(RunChanged(RunInfo(run_id, "", "", "deleted", 0.0, time.time(), {})))
    try:
        await run_in_threadpool(store.purge_deleted)
    except StorageError as exc:
        # The run is deleted, and every dashboard told: a 503 would have the admin
        # try again, to a 404. Its points are out of every reader's way, and go at
        # the next delete or start.
        logger.warning("run %s deleted; its points are left for later (%s)", run_id, exc)
    return Response(status_code=204)
