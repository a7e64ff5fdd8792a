"""How many points per second the server commits to SQLite and acknowledges, on one core.

Target: at least 300,000 points/s sustained, acknowledged (each acknowledgement
means the batch is committed to SQLite), with the server on one core.

The server is ``python -m trainwire serve --port 0 --data DIR --token T`` pinned to
CPU 0 (``os.sched_setaffinity``, as taskset). This process, pinned to CPU 1, is the
load generator: it encodes every frame beforehand (``Hello`` and ``Batch`` from
``trainwire.protocol.messages``, msgpack by msgspec; by default 1000 rows x 10 keys =
10,000 points per batch), then sends them over the ``websockets`` sync client with
at most 64 batches unacknowledged per connection (as the trainwire client does) and
counts the acknowledgements. The figure is the points acknowledged per second
after a warm-up, up to the deadline; the server's CPU use over the same window
says whether it was the bottleneck.

Usage::

    .venv/bin/python bench/ingest.py                 # 20 s
    .venv/bin/python bench/ingest.py --quick         # 5 s
    .venv/bin/python bench/ingest.py --profile       # and a py-spy profile of the server
    .venv/bin/python bench/ingest.py --connections 4 # 4 trainers at once
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import _common as c
import msgspec
from websockets.sync.client import connect

from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Hello,
    RunSpec,
    ServerToTrainer,
    Welcome,
)

NAME = "ingest"
TARGET_POINTS_PER_S = 300_000
WINDOW = 64  # batches in flight per connection, as ClientSession's default
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ServerToTrainer)


def hello_frame(run_id: str) -> bytes:
    """The ``hello`` that opens run ``run_id`` (stream "bench")."""
    return _encoder.encode(
        Hello(
            v=PROTOCOL_VERSION,
            run=RunSpec(id=run_id, project="bench", name=run_id),
            stream="bench",
            client="bench/ingest",
        )
    )


def batch_frames(batches: int, rows: int, keys: int, *, first_time: float) -> Iterator[bytes]:
    """``batches`` batch frames (seq 1, 2, ...) of ``rows`` rows x ``keys`` keys."""
    names = [f"train/metric{k}" for k in range(keys)]
    # A few value dicts shared by the rows: encoding cost is not what is measured.
    values = [{name: (v * keys + k) / 7.0 for k, name in enumerate(names)} for v in range(8)]
    for seq in range(1, batches + 1):
        base = (seq - 1) * rows
        batch_rows = [
            (base + r, first_time + (base + r) * 1e-3, values[r % 8]) for r in range(rows)
        ]
        yield _encoder.encode(Batch(seq=seq, rows=batch_rows))


def encode_run(
    run_id: str, batches: int, rows: int, keys: int, *, first_time: float
) -> tuple[bytes, list[bytes]]:
    """The ``hello`` frame of a run and ``batches`` batch frames, encoded now."""
    return hello_frame(run_id), list(batch_frames(batches, rows, keys, first_time=first_time))


@dataclass
class Trainer:
    """One connection's load: a thread sends its frames, at most ``WINDOW`` ahead of the
    acknowledgements, until the deadline; another receives and timestamps the acks."""

    ws_url: str
    hello: bytes
    frames: Iterable[bytes]  # a list (encoded beforehand) or a generator
    points_per_batch: int
    acks: list[tuple[float, int]] = field(default_factory=list)  # (time, seq)
    exhausted: bool = False
    error: str | None = None

    def run(self, start: threading.Barrier, deadline: list[float]) -> None:
        try:
            with connect(
                self.ws_url,
                additional_headers={"Authorization": f"Bearer {c.TOKEN}"},
                max_size=None,
                compression=None,
                open_timeout=30,
            ) as ws:
                ws.send(self.hello)
                answer = ws.recv(timeout=30)
                assert isinstance(answer, bytes), answer
                welcome = _decoder.decode(answer)
                assert isinstance(welcome, Welcome), welcome
                room = threading.Semaphore(WINDOW)
                sent = [0]
                done = threading.Event()
                receiver = threading.Thread(
                    target=self._receive, args=(ws, room, sent, done), daemon=True
                )
                receiver.start()
                start.wait()
                for frame in self.frames:
                    while not room.acquire(timeout=0.1):
                        if time.monotonic() >= deadline[0]:
                            break
                    if time.monotonic() >= deadline[0]:
                        break
                    ws.send(frame)
                    sent[0] += 1
                else:
                    self.exhausted = True
                done.set()
                receiver.join(60)
        except Exception as exc:  # reported with the figures
            self.error = f"{type(exc).__name__}: {exc}"

    def _receive(
        self, ws: Any, room: threading.Semaphore, sent: list[int], done: threading.Event
    ) -> None:
        acked = 0
        try:
            while not (done.is_set() and acked >= sent[0]):
                try:
                    message = _decoder.decode(ws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                if isinstance(message, Ack) and message.seq > acked:
                    self.acks.append((time.monotonic(), message.seq))
                    room.release(message.seq - acked)
                    acked = message.seq
        except Exception as exc:  # reported with the figures
            self.error = f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s instead of 20 s")
    parser.add_argument("--seconds", type=float, default=None, help="load duration")
    parser.add_argument("--warmup", type=float, default=None, help="seconds not counted")
    parser.add_argument("--rows", type=int, default=1000, help="rows per batch")
    parser.add_argument("--keys", type=int, default=10, help="keys per row")
    parser.add_argument("--connections", type=int, default=1, help="trainers at once")
    parser.add_argument(
        "--ceiling", type=float, default=700_000, help="points/s the frames are encoded for"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the server")
    args = parser.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    points_per_batch = args.rows * args.keys
    batches = math.ceil(args.ceiling * seconds / points_per_batch / args.connections) + WINDOW
    c.header(NAME, "points/s committed to SQLite and acknowledged, server on one core", args.quick)

    with c.client_environment(NAME) as tmp:
        server = c.ServerProcess(tmp / "server", cpus={0})
        c.pin({1})
        print(
            f"  encoding {args.connections} x {batches} batches of {args.rows} rows x"
            f" {args.keys} keys...",
            flush=True,
        )
        trainers = []
        for n in range(args.connections):
            hello, frames = encode_run(
                f"bench-ingest-{n}", batches, args.rows, args.keys, first_time=time.time()
            )
            trainers.append(Trainer("", hello, frames, points_per_batch))
        mib = sum(len(f) for t in trainers for f in t.frames) / 2**20
        print(f"  {mib:.0f} MiB of frames; starting the server on CPU 0", flush=True)
        with server:
            start = threading.Barrier(args.connections + 1)
            deadline = [math.inf]
            threads = []
            for trainer in trainers:
                trainer.ws_url = server.ws_url + "/ws/ingest"
                thread = threading.Thread(target=trainer.run, args=(start, deadline), daemon=True)
                thread.start()
                threads.append(thread)
            start.wait()
            t0 = time.monotonic()
            deadline[0] = t0 + seconds
            time.sleep(warmup)
            cpu0, w0 = server.cpu(), time.monotonic()
            load = c.MachineLoad([server.pid])
            profiler = c.Profiler(NAME, server.pid, seconds - warmup) if args.profile else None
            time.sleep(max(0.0, deadline[0] - time.monotonic()))
            cpu1, w1 = server.cpu(), time.monotonic()
            machine_load = load.stop()
            rss = server.rss()
            for thread in threads:
                thread.join(60)
            profile = profiler.summary() if profiler else []
        with sqlite3.connect(tmp / "server" / "trainwire.db") as db:
            stored = db.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0]

    errors = [t.error for t in trainers if t.error]
    window_start, window_end = t0 + warmup, deadline[0]
    acked_in_window = 0
    acked_total = 0
    for trainer in trainers:
        previous = 0
        for at, seq in trainer.acks:
            if window_start <= at <= window_end:
                acked_in_window += (seq - previous) * trainer.points_per_batch
            previous = seq
        acked_total += previous * trainer.points_per_batch
    rate = acked_in_window / (window_end - window_start)
    server_cpu = (cpu1 - cpu0) / (w1 - w0)
    per_cpu_second = acked_in_window / (cpu1 - cpu0) if cpu1 > cpu0 else math.nan
    exhausted = any(t.exhausted for t in trainers)
    print()
    print(
        f"  {acked_total:,} points acknowledged, {stored:,} stored; server CPU"
        f" {server_cpu:.0%} of one core over the window; server RSS {rss / 2**20:.0f} MiB"
    )
    print(
        f"  per second of server CPU: {per_cpu_second:,.0f} points (what a core of its own"
        " would sustain if the server were the bottleneck)"
    )
    if exhausted:
        print("  the generator ran out of frames: the rate is at least the figure; raise --ceiling")
    for error in errors:
        print(f"  trainer error: {error}")
    note = (
        f"{args.connections} connection(s), {args.rows} rows x {args.keys} keys per batch;"
        f" server CPU {server_cpu:.0%}; {per_cpu_second:,.0f} points per server CPU-second"
    )
    checks = [
        c.Check(
            "points/s acknowledged",
            rate if not errors else math.nan,
            "points/s",
            TARGET_POINTS_PER_S,
            better="higher",
            note=note,
        )
    ]
    data: dict[str, Any] = {
        "points_acknowledged": acked_total,
        "points_stored": stored,
        "measured_window_s": window_end - window_start,
        "server_cpu_fraction": server_cpu,
        "points_per_server_cpu_second": per_cpu_second,
        "server_rss_bytes": rss,
        "generator_exhausted": exhausted,
        "errors": errors,
        "profile": profile,
    }
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={
            "seconds": seconds,
            "warmup": warmup,
            "rows_per_batch": args.rows,
            "keys": args.keys,
            "connections": args.connections,
            "window": WINDOW,
            "server_cpus": [0],
            "generator_cpus": [1],
        },
        data=data,
        load=machine_load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
