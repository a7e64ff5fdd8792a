"""Scale: a server whose database a team has filled over months.

The data directory is written through the store itself (``SQLiteStore.open_run``,
``append_batch``, ``set_status``), not by training, in about a minute and a half:

- a sweep: 5,000 finished runs, each with a 4 KB config (24 layers described, 40
  data shards) and a 1 KB environment (8 GPUs, 30 arguments), 6 keys of 500 steps;
- 2 runs of 400 keys (per-layer gradient norms) of 10,000 steps: 4,000,000 points each;
- 2 runs of 4 keys of 3,000,000 steps: 12,000,000 points each (one still running).

About 1.2 GB. Then ``python -m trainwire serve`` on it (its own process), and what a
user feels, each the best of 3 (a cold first read is printed apart):

- start-up until ``GET /api/health`` answers;
- ``GET /api/runs``, and a dashboard's first frames (``hello``, ``runs``);
- what the dashboard asks when a run is opened: ``GET /api/runs/{id}`` and
  ``/metrics?points=2000`` of a 400-key run and of a 12,000,000-point run;
- every point of one key of 3,000,000 steps, as JSON and as CSV;
- ``DELETE`` of the 12,000,000-point run, and how long a small read waited meanwhile
  (the store is one connection under a lock);
- the server's RSS at the end.

Targets (this bench's own: what keeps such a server usable): the run list and the
dashboard's first frames within 1 s; opening a run (``/metrics?points=2000``) within
2 s; the CSV of 3,000,000 points within 5 s; nothing else waits more than 2 s for a
delete; the server's RSS within 1 GB.

Usage::

    .venv/bin/python bench/scale.py            # the sizes above
    .venv/bin/python bench/scale.py --quick    # a fifth of the runs, a tenth of the points
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c
from websockets.sync.client import connect

from trainwire.protocol.messages import Batch, RunSpec
from trainwire.storage import SQLiteStore

NAME = "scale"
LIST_TARGET_S = 1.0
OPEN_TARGET_S = 2.0
CSV_TARGET_S = 5.0
DELETE_WAIT_TARGET_S = 2.0
RSS_TARGET_MB = 1000.0
MB = 1e6

ENV = {
    "host": "gpu-node-017.cluster.example.org",
    "os": "Linux-5.15-x86_64",
    "python": "3.12.3",
    "argv": ["train.py", "--config", "configs/big.yaml"] + [f"--opt{k}=v" for k in range(30)],
    "pid": 12345,
    "torch": "2.4.0",
    "cuda": "12.4",
    "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory": 85899345920}] * 8,
}


def config(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    layer = {"dropout": 0.1, "ffn": 4096, "act": "gelu", "norm": "rms", "init": {"std": 0.02}}
    return {
        "lr": 10 ** rng.uniform(-5, -2),
        "batch_size": rng.choice([32, 64, 128, 256]),
        "seed": seed,
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.01},
        "model": {"d_model": 1024, "layers": [{"index": j, **layer} for j in range(24)]},
        "data": {"paths": [f"/datasets/shard-{k:05d}.tar" for k in range(40)]},
        "notes": "x" * 200,
    }


def write_run(
    store: SQLiteStore,
    run_id: str,
    keys: list[str],
    steps: int,
    batch_rows: int,
    start: float,
    status: str = "finished",
) -> None:
    spec = RunSpec(id=run_id, project="scale", name=run_id, config=config(len(run_id)), env=ENV)
    store.open_run(spec, "s", start)
    seq = 0
    for first in range(0, steps, batch_rows):
        rows = [
            (s, start + s * 0.01, {k: math.sin(s * 1e-3 + i) + i for i, k in enumerate(keys)})
            for s in range(first, min(steps, first + batch_rows))
        ]
        seq += 1
        store.append_batch(run_id, "s", Batch(seq=seq, rows=rows), start + first * 0.01)
    if status != "running":
        store.set_status(run_id, "s", status, seq + 1, start + steps * 0.01)


def build(path: Path, sweep: int, layer_keys: int, layer_steps: int, long_steps: int) -> None:
    store = SQLiteStore(path)
    t0 = 1.7e9
    sweep_keys = ["train/loss", "train/acc", "val/loss", "val/acc", "lr", "grad_norm"]
    for i in range(sweep):
        status = "crashed" if i % 50 == 7 else "finished"
        write_run(store, f"sweep-{i:05d}", sweep_keys, 500, 500, t0 + i * 60, status)
    parts = ("attn.q", "attn.k", "mlp.up", "mlp.down")
    keys = [f"grad_norm/layer.{j}.{p}" for j in range(layer_keys // 4) for p in parts]
    for r in range(2):
        write_run(store, f"layers-{r}", keys, layer_steps, 4096, t0 + 1e6 + r)
    long_keys = ["loss", "lr", "grad_norm", "tokens_per_s"]
    for r in range(2):
        status = "running" if r else "finished"
        write_run(store, f"long-{r}", long_keys, long_steps, 8192, t0 + 2e6 + r, status)
    store.close()


def request(url: str, method: str, path: str) -> tuple[int, int]:
    """One request with the bench's token: its status and the bytes of its body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {c.TOKEN}"})
        response = conn.getresponse()
        return response.status, len(response.read())
    finally:
        conn.close()


def best_of(repeats: int, action: Callable[[], int]) -> tuple[float, float, int]:
    """``action`` timed ``repeats`` times: (first, best) seconds, and its last result."""
    times = []
    result = 0
    for _ in range(repeats):
        t = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - t)
    return times[0], min(times), result


def dashboard_greeting(ws_url: str) -> int:
    """A dashboard's connection until its run list: the size of that frame. With
    permessage-deflate, as browsers ask for it."""
    with connect(
        ws_url + "/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {c.TOKEN}"},
        max_size=None,
    ) as ws:
        hello = json.loads(ws.recv(timeout=60))
        runs = ws.recv(timeout=60)
        # Not parsed: tens of megabytes would time this process's JSON parser.
        assert hello["type"] == "hello"
        assert isinstance(runs, str) and runs.startswith('{"type":"runs"')
        return len(runs)


def waited_during(url: str, action: Callable[[], object]) -> tuple[float, float]:
    """``action``'s seconds, and the longest a small read took that overlapped it."""
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def poke() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            request(url, "GET", "/api/runs/sweep-00001/metrics")
            spans.append((t, time.perf_counter()))

    thread = threading.Thread(target=poke, daemon=True)
    thread.start()
    time.sleep(0.3)  # the poker under way
    began = time.perf_counter()
    action()
    ended = time.perf_counter()
    time.sleep(0.3)  # the read the action held up completes
    stop.set()
    thread.join()
    return ended - began, max(e - s for s, e in spans if e > began and s < ended)


def show(name: str, first: float, best: float, size: int) -> None:
    print(f"  {name:<40} first {first:7.3f} s  best {best:7.3f} s  {size / MB:8.2f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a fifth of the runs, a tenth of the points"
    )
    parser.add_argument(
        "--keep", type=Path, help="build into (or reuse) this folder, kept afterwards"
    )
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    sweep, layer_keys = (1000, 400) if args.quick else (5000, 400)
    layer_steps, long_steps = 10_000 // scale, 3_000_000 // scale
    with tempfile.TemporaryDirectory() as tmp:
        data = args.keep or Path(tmp) / "data"
        db = data / "trainwire.db"
        built_s = 0.0
        if not db.exists():
            t = time.perf_counter()
            build(db, sweep, layer_keys, layer_steps, long_steps)
            built_s = time.perf_counter() - t
        size_mb = db.stat().st_size / MB
        print(f"  database {size_mb:.0f} MB (built in {built_s:.0f} s)")
        t = time.perf_counter()
        server = c.ServerProcess(data)
        with server:
            startup_s = time.perf_counter() - t
            load = c.MachineLoad([server.pid])
            url = server.url
            figures: dict[str, Any] = {"startup_s": startup_s, "database_mb": size_mb}

            def timed(name: str, method: str, path: str, repeats: int = 3) -> float:
                first, best, size = best_of(repeats, lambda: request(url, method, path)[1])
                figures[name] = {"first_s": first, "best_s": best, "mb": size / MB}
                show(name, first, best, size)
                return best

            list_s = timed("GET /api/runs", "GET", "/api/runs")
            first, greeting_s, frame = best_of(3, lambda: dashboard_greeting(server.ws_url))
            figures["dashboard runs frame"] = {
                "first_s": first,
                "best_s": greeting_s,
                "mb": frame / MB,
            }
            show("dashboard hello + runs", first, greeting_s, frame)
            timed("GET /api/runs/layers-0", "GET", "/api/runs/layers-0")
            layers_s = timed(
                "layers-0 metrics?points=2000", "GET", "/api/runs/layers-0/metrics?points=2000"
            )
            long_s = timed(
                "long-0 metrics?points=2000", "GET", "/api/runs/long-0/metrics?points=2000"
            )
            timed("long-0 loss, every point (JSON)", "GET", "/api/runs/long-0/metrics?keys=loss", 1)
            csv_s = timed(
                "long-0 loss, every point (CSV)", "GET", "/api/runs/long-0/csv?key=loss", 1
            )
            delete_s, waited_s = waited_during(
                url, lambda: request(url, "DELETE", "/api/runs/long-0")
            )
            figures["DELETE long-0"] = {"s": delete_s, "small_read_waited_s": waited_s}
            print(
                f"  DELETE long-0: {delete_s:.3f} s; a small read meanwhile waited {waited_s:.3f} s"
            )
            rss_mb = server.rss() / MB
        machine_load = load.stop()
    print(f"  start-up {startup_s:.2f} s; server RSS at the end {rss_mb:.0f} MB")
    scaled = "" if not args.quick else "quick: a fifth of the runs, a tenth of the points"
    checks = [
        c.Check("GET /api/runs", list_s, "s", LIST_TARGET_S, note=f"{sweep + 4} runs"),
        c.Check("dashboard hello + runs frames", greeting_s, "s", LIST_TARGET_S, note=scaled),
        c.Check("400-key run, metrics?points=2000", layers_s, "s", OPEN_TARGET_S),
        c.Check("4 x 3M-step run, metrics?points=2000", long_s, "s", OPEN_TARGET_S, note=scaled),
        c.Check("CSV of one key of 3M steps", csv_s, "s", CSV_TARGET_S, note=scaled),
        c.Check("a read waiting for DELETE of 12M points", waited_s, "s", DELETE_WAIT_TARGET_S),
        c.Check("server RSS at the end", rss_mb, "MB", RSS_TARGET_MB),
    ]
    params = {"sweep_runs": sweep, "layer_keys": layer_keys, "layer_steps": layer_steps}
    params["long_steps"] = long_steps
    c.report(NAME, checks, quick=args.quick, params=params, data=figures, load=machine_load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
