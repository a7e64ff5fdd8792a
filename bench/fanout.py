"""Fan-out: many dashboards following one live run, the server on one core.

Target: 500 dashboard sockets following one run that receives 20 batches/s; the
delay from a batch being sent by the trainer to each socket receiving it has a
p99 of at most 250 ms, with the server on one core.

The server is ``python -m trainwire serve --port 0`` pinned to CPU 0. This process,
pinned to CPU 1, holds the dashboards: on one asyncio loop, each a bare asyncio
transport driven by websockets' sans-I/O ``ClientProtocol`` (lean, so that the
measuring side stays fast), that subscribes to the run (``{"type": "subscribe",
"after": 0}``) and notes ``time.time()`` when each batch arrives. The server allows 256 sockets
per client address, so the dashboards connect from 127.0.0.2, 127.0.0.3, ...
(200 each). The trainer is a child process, also on CPU 1: it speaks the ingest
protocol directly, sending one ``Batch`` (5 rows x 3 keys) every 50 ms whose rows
carry the send time as their ``time``, so every socket can compute each batch's
delay from the points it receives. The first second of batches is a warm-up.

The dashboards share one core with the trainer: when this process is busy, the
delays include its own queueing (its CPU use is printed), so the figure is an
upper bound of what the server adds.

Usage::

    .venv/bin/python bench/fanout.py            # 500 sockets, 30 s
    .venv/bin/python bench/fanout.py --quick    # 200 sockets, 5 s (a reduced scale)
    .venv/bin/python bench/fanout.py --profile  # and a py-spy profile of the server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import threading
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

import _common as c
import msgspec
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.sync.client import connect
from websockets.uri import parse_uri

from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    RunSpec,
    ServerToTrainer,
    Welcome,
)

NAME = "fanout"
TARGET_P99_MS = 250.0
FULL_SOCKETS, FULL_SECONDS = 500, 30.0
QUICK_SOCKETS, QUICK_SECONDS = 200, 5.0
WARMUP_S = 1.0
PER_ADDRESS = 200  # under the server's 256 sockets per client address
RUN_ID = "bench-fanout"
KEY = "train/loss"
_encoder = msgspec.msgpack.Encoder()


class _Series(msgspec.Struct):
    time: list[float]


class _Frame(msgspec.Struct):
    type: str
    run: Any = None  # a run id in "points", a RunInfo in "run"
    series: dict[str, _Series] = {}


_frame_decoder = msgspec.json.Decoder(_Frame)
SUBSCRIBE = json.dumps({"type": "subscribe", "run": RUN_ID, "after": 0}).encode()


def trainer(
    ws_url: str,
    token: str,
    batches_per_s: float,
    seconds: float,
    rows: int,
    ready: EventType,
    go: EventType,
    cpus: set[int],
) -> None:
    """The trainer process: hello, then one batch every 1/batches_per_s seconds."""
    c.pin(cpus)
    decoder = msgspec.msgpack.Decoder(ServerToTrainer)
    hello = Hello(
        v=PROTOCOL_VERSION,
        run=RunSpec(id=RUN_ID, project="bench", name=NAME),
        stream="bench",
        client="bench/fanout",
    )
    with connect(
        ws_url + "/ws/ingest",
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
    ) as ws:
        ws.send(_encoder.encode(hello))
        welcome = ws.recv(timeout=30)
        assert isinstance(welcome, bytes) and isinstance(decoder.decode(welcome), Welcome)

        def drain_acks() -> None:  # acks unread would stall the server's sends
            try:
                for _ in ws:
                    pass
            except Exception:
                return

        threading.Thread(target=drain_acks, daemon=True).start()
        ready.set()
        go.wait()
        start = time.perf_counter()
        count = int(seconds * batches_per_s)
        for seq in range(1, count + 1):
            pause = start + (seq - 1) / batches_per_s - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            now = time.time()
            batch_rows = [
                ((seq - 1) * rows + r, now, {KEY: 1.0 / seq, "train/acc": 0.5, "lr": 3e-3})
                for r in range(rows)
            ]
            ws.send(_encoder.encode(Batch(seq=seq, rows=batch_rows)))
        time.sleep(0.5)


class Dashboards:
    """What every dashboard socket received: (batch sent at, delay) per socket per batch."""

    def __init__(self, sockets: int) -> None:
        self.delays: list[tuple[float, float]] = []
        self.counts = [0] * sockets
        self.errors: list[str] = []
        self.waiting = sockets
        self.subscribed = asyncio.Event()

    def answered(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.subscribed.set()


class Dashboard(asyncio.Protocol):
    """One dashboard socket: websockets' sans-I/O client over a bare asyncio transport.

    Lean on purpose: 500 of them share one core with the trainer, and the cost of
    each receipt here would be counted as delay.
    """

    def __init__(self, index: int, ws_url: str, sink: Dashboards) -> None:
        self.index = index
        self.sink = sink
        self.ws = ClientProtocol(parse_uri(ws_url + "/ws/dashboard"), max_size=None)
        self.transport: asyncio.Transport | None = None
        self.first = True
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.ws.connect()
        request.headers["Authorization"] = f"Bearer {c.TOKEN}"
        self.ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self._fail(f"handshake answered {event.status_code}")
                    return
                self.ws.send_text(SUBSCRIBE)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._frame(bytes(event.data), now)
        self._flush()

    def _frame(self, text: bytes, now: float) -> None:
        frame = _frame_decoder.decode(text)
        if frame.type != "points" or frame.run != RUN_ID:
            return
        if self.first:  # the answer to subscribe: the (empty) snapshot
            self.first = False
            self.sink.answered()
            return
        series = frame.series.get(KEY)
        if series is not None:
            for sent in set(series.time):
                self.sink.delays.append((sent, now - sent))
                self.sink.counts[self.index] += 1

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def _fail(self, why: str) -> None:
        self.sink.errors.append(f"socket {self.index}: {why}")
        if self.first:
            self.first = False
            self.sink.answered()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.first:
            self._fail(f"connection lost: {exc}")
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ws.send_close()
            self._flush()
            self.transport.close()


async def open_dashboard(index: int, ws_url: str, sink: Dashboards) -> Dashboard | None:
    host, port = ws_url.removeprefix("ws://").split(":")
    address = f"127.0.0.{2 + index // PER_ADDRESS}"
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(
            lambda: Dashboard(index, ws_url, sink), host, int(port), local_addr=(address, 0)
        )
    except OSError as exc:
        sink.errors.append(f"socket {index}: {exc}")
        sink.answered()
        return None
    return protocol


async def follow(
    ws_url: str,
    sockets: int,
    seconds: float,
    rate: float,
    ready: EventType,
    go: EventType,
    server_pid: int,
    profile: bool = False,
) -> dict[str, Any]:
    sink = Dashboards(sockets)
    if not await asyncio.to_thread(ready.wait, 60):  # the run exists: subscribe to it
        raise RuntimeError("the trainer did not open its run")
    t0 = time.monotonic()
    opened: list[Dashboard | None] = []
    for first in range(0, sockets, 50):  # in waves: the server's accept queue stays short
        wave = range(first, min(sockets, first + 50))
        opened += await asyncio.gather(*(open_dashboard(i, ws_url, sink) for i in wave))
    await asyncio.wait_for(sink.subscribed.wait(), 120)
    connect_s = time.monotonic() - t0
    print(f"  {sockets - len(sink.errors)} sockets subscribed in {connect_s:.1f} s", flush=True)
    started = time.time()
    cpu0, server0, wall0 = c.cpu_seconds(), c.cpu_seconds(server_pid), time.monotonic()
    profiler = c.Profiler(NAME, server_pid, seconds) if profile else None
    go.set()
    await asyncio.sleep(seconds + 1.0)
    # Then until every socket has every batch (a late one still counts, with its
    # delay), or nothing arrived for 5 s, or 60 s at most.
    expected = int(seconds * rate) * (sockets - len(sink.errors))
    last, idle_since = -1, time.monotonic()
    while len(sink.delays) < expected and time.monotonic() - idle_since < 5:
        if time.monotonic() - wall0 > seconds + 60:
            break
        if len(sink.delays) != last:
            last, idle_since = len(sink.delays), time.monotonic()
        await asyncio.sleep(0.1)
    wall = time.monotonic() - wall0
    cpu = (c.cpu_seconds() - cpu0) / wall
    server_cpu_s = c.cpu_seconds(server_pid) - server0
    deliveries = len(sink.delays)
    dashboards = [d for d in opened if d is not None]
    for dashboard in dashboards:
        dashboard.close()
    await asyncio.wait([d.closed for d in dashboards], timeout=10)
    return {
        "profile": await asyncio.to_thread(profiler.summary) if profiler else [],
        "delays": sink.delays,
        "counts": sink.counts,
        "errors": sink.errors,
        "connect_s": connect_s,
        "started": started,
        "client_cpu": cpu,
        "server_cpu": server_cpu_s / wall,
        "server_cpu_per_delivery_us": server_cpu_s / deliveries * 1e6 if deliveries else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 sockets for 5 s")
    parser.add_argument("--sockets", type=int, default=None, help="dashboard sockets")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of batches")
    parser.add_argument("--rate", type=float, default=20.0, help="batches per second")
    parser.add_argument("--rows", type=int, default=5, help="rows per batch")
    parser.add_argument("--profile", action="store_true", help="py-spy the server")
    args = parser.parse_args(argv)
    sockets = args.sockets or (QUICK_SOCKETS if args.quick else FULL_SOCKETS)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    reduced = sockets < FULL_SOCKETS or seconds < FULL_SECONDS
    c.header(NAME, f"{sockets} dashboards on one run, {args.rate:g} batches/s", args.quick)
    if reduced:
        print(
            f"  REDUCED SCALE: {sockets} sockets for {seconds:g} s"
            f" (the target is {FULL_SOCKETS} sockets; full mode runs {FULL_SECONDS:g} s)"
        )
    c.raise_fd_limit(4 * sockets + 256)

    with c.client_environment(NAME) as tmp, c.ServerProcess(tmp / "server", cpus={0}) as server:
        context = multiprocessing.get_context("fork")
        ready, go = context.Event(), context.Event()
        process = context.Process(
            target=trainer,
            args=(server.ws_url, c.TOKEN, args.rate, seconds, args.rows, ready, go, {1}),
            daemon=True,
        )
        process.start()
        assert process.pid is not None
        c.pin({1})
        load = c.MachineLoad([server.pid, process.pid])
        result = asyncio.run(
            follow(server.ws_url, sockets, seconds, args.rate, ready, go, server.pid, args.profile)
        )
        server_cpu = result["server_cpu"]
        machine_load = load.stop()
        process.join(10)
        rss = server.rss()

    started = result["started"]
    warmup_batches = int(WARMUP_S * args.rate)
    counted = [(sent, delay) for sent, delay in result["delays"] if sent >= started + WARMUP_S]
    delays_ms = [delay * 1000 for _, delay in counted]
    batches_counted = int(seconds * args.rate) - warmup_batches
    expected = batches_counted * (sockets - len(result["errors"]))
    missing = expected - len(delays_ms)
    # A delivery that never came counts as infinitely late.
    dist = c.distribution(delays_ms + [math.inf] * max(0, missing))
    batches_counted = int(seconds * args.rate) - warmup_batches
    by_second: dict[int, list[float]] = {}
    for sent, delay in result["delays"]:
        by_second.setdefault(int(sent - started), []).append(delay * 1000)
    timeline = [
        {"second": k, "p50_ms": c.median(v), "p99_ms": c.percentile(v, 99), "deliveries": len(v)}
        for k, v in sorted(by_second.items())
    ]
    print(
        "  delay by second of the run (p50 / p99 ms): "
        + ", ".join(f"{t['p50_ms']:.0f}/{t['p99_ms']:.0f}" for t in timeline)
    )
    expected = batches_counted * (sockets - len(result["errors"]))
    missing = expected - len(delays_ms)
    print()
    print(
        f"  {len(delays_ms):,} deliveries ({batches_counted} batches after the warm-up x"
        f" {sockets - len(result['errors'])} sockets; {missing} never arrived):"
        f" p50 {dist['p50']:.1f} ms, p90 {dist['p90']:.1f}, p99 {dist['p99']:.1f},"
        f" max {dist['max']:.1f} ms"
    )
    print(
        f"  server CPU {server_cpu:.0%} of its core; dashboards' process CPU"
        f" {result['client_cpu']:.0%} of its core; server RSS {rss / 2**20:.0f} MiB"
    )
    per_delivery = result["server_cpu_per_delivery_us"]
    if per_delivery:
        projected = per_delivery * FULL_SOCKETS * args.rate / 1e6
        print(
            f"  server CPU per delivery {per_delivery:.0f} µs: {FULL_SOCKETS} sockets x"
            f" {args.rate:g} batches/s would take {projected:.0%} of a core of its own"
        )
    for error in result["errors"][:5]:
        print(f"  {error}")
    note = f"{sockets} sockets, {seconds:g} s" + (" (REDUCED SCALE)" if reduced else "")
    note += f"; server CPU {server_cpu:.0%}, dashboards' CPU {result['client_cpu']:.0%}"
    checks = [
        c.Check("batch -> every dashboard socket, p99", dist["p99"], "ms", TARGET_P99_MS, note=note)
    ]
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={
            "sockets": sockets,
            "seconds": seconds,
            "batches_per_s": args.rate,
            "rows_per_batch": args.rows,
            "reduced_scale": reduced,
            "warmup_batches": warmup_batches,
            "server_cpus": [0],
            "client_cpus": [1],
        },
        data={
            "delay_ms": dist,
            "timeline": timeline,
            "profile": result["profile"],
            "deliveries": len(delays_ms),
            "missing": missing,
            "socket_errors": result["errors"][:20],
            "connect_s": result["connect_s"],
            "server_cpu_fraction": server_cpu,
            "server_cpu_per_delivery_us": per_delivery,
            "client_cpu_fraction": result["client_cpu"],
            "server_rss_bytes": rss,
            "started": started,
        },
        load=machine_load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
