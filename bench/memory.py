"""Memory: the server's under sustained ingest, and the client's while the server is away.

Targets:

- server: its RSS grows by at most 50 MB over 10,000,000 ingested points (quick
  mode: 1,000,000 points, and the scale is printed as such);
- client: while the server is unreachable, the training process's memory stays
  bounded (it holds at most ``max_memory_rows`` rows, none for more than 5 s, and
  spills the rest to the run's file, which grows up to ``max_disk_bytes``).
  "Bounded" is measured as: RSS growth from the end of the first 10% of the rows to
  the end at most 10 MB, and the run's file at most ``max_disk_bytes``.

Server part: ``python -m trainwire serve --port 0`` (its own process, pinned to CPU
0); this process, on CPU 1, sends batches of 1000 rows x 10 keys over one ingest
connection (as ``bench/ingest.py`` does, but encoding each frame just before it is
sent) and samples the server's RSS (``/proc/PID/statm``) every 0.2 s. Growth is
measured from the RSS after the first 2% of the points (one-time allocations:
SQLite's page cache, the thread pool, imports) to the largest RSS seen after.
``--dashboard`` adds one dashboard socket following the run.

Client part: ``trainwire.init(url=<a port that refuses connections>,
max_memory_rows=10_000, max_disk_bytes=...)`` and ``run.log()`` of three floats at a
steady 50,000 rows/s (a very fast training loop), sampling this process's RSS, the
rows waiting for the sender and the run file's size. A second, unpaced pass (a
tight loop) is reported too, not judged: it shows what happens when the loop logs
faster than the sender thread can convert and spill.

Usage::

    .venv/bin/python bench/memory.py            # 10M points; 3M rows
    .venv/bin/python bench/memory.py --quick    # 1M points; 500k rows
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from typing import Any

import _common as c
from ingest import Trainer, batch_frames, hello_frame
from websockets.sync.client import connect

import trainwire
from trainwire.client.spool import SpillingOutbox

NAME = "memory"
SERVER_TARGET_MB = 50.0
CLIENT_TARGET_MB = 10.0
ROWS, KEYS = 1000, 10
MB = 1e6


def follow_run(ws_url: str, run_id: str, stop: threading.Event) -> None:
    """One dashboard socket reading everything of ``run_id`` until ``stop``."""
    with connect(
        ws_url + "/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {c.TOKEN}"},
        compression=None,
        max_size=None,
    ) as ws:
        ws.send(json.dumps({"type": "subscribe", "run": run_id, "after": 0}))
        while not stop.is_set():
            try:
                ws.recv(timeout=0.2)
            except TimeoutError:
                continue


def server_part(points: int, tmp: Any, dashboard: bool) -> tuple[list[c.Check], dict[str, Any]]:
    batches = math.ceil(points / (ROWS * KEYS))
    run_id = "bench-memory"
    server = c.ServerProcess(tmp / "server", cpus={0})
    with server:
        c.pin({1})
        frames = batch_frames(batches, ROWS, KEYS, first_time=time.time())
        trainer = Trainer(server.ws_url + "/ws/ingest", hello_frame(run_id), frames, ROWS * KEYS)
        start = threading.Barrier(2)
        deadline = [math.inf]
        thread = threading.Thread(target=trainer.run, args=(start, deadline), daemon=True)
        samples: list[tuple[float, int, int]] = []  # (seconds, points acked, rss)
        stop = threading.Event()
        watcher = None
        rss_start = server.rss()
        thread.start()
        start.wait()
        if dashboard:
            watcher = threading.Thread(
                target=follow_run, args=(server.ws_url, run_id, stop), daemon=True
            )
            watcher.start()
        t0 = time.monotonic()
        load = c.MachineLoad([server.pid])
        while thread.is_alive():
            acked = trainer.acks[-1][1] * ROWS * KEYS if trainer.acks else 0
            samples.append((time.monotonic() - t0, acked, server.rss()))
            if len(samples) % 50 == 0:
                print(
                    f"  {acked:>12,} points acked, server RSS {samples[-1][2] / MB:.1f} MB",
                    flush=True,
                )
            thread.join(0.2)
        samples.append((time.monotonic() - t0, batches * ROWS * KEYS, server.rss()))
        machine_load = load.stop()
        stop.set()
        if watcher is not None:
            watcher.join(5)
    elapsed = samples[-1][0]
    acked_total = trainer.acks[-1][1] * ROWS * KEYS if trainer.acks else 0
    warm = next((s for s in samples if s[1] >= 0.02 * points), samples[0])
    peak = max(rss for _, _, rss in samples if _ >= warm[0])
    growth = (peak - warm[2]) / MB
    final_growth = (samples[-1][2] - warm[2]) / MB
    scale = "" if points >= 10_000_000 else f"REDUCED SCALE: {points:,} points, not 10,000,000"
    print(
        f"  server: {acked_total:,} points in {elapsed:.0f} s; RSS {rss_start / MB:.1f} MB idle,"
        f" {warm[2] / MB:.1f} MB after {warm[1]:,} points, peak {peak / MB:.1f} MB,"
        f" final {samples[-1][2] / MB:.1f} MB" + (f"  [{scale}]" if scale else "")
    )
    if trainer.error:
        print(f"  trainer error: {trainer.error}")
    check = c.Check(
        f"server RSS growth over {points / 1e6:g}M points",
        growth if not trainer.error else math.nan,
        "MB",
        SERVER_TARGET_MB,
        note=(scale + "; " if scale else "")
        + f"from {warm[2] / MB:.0f} MB to a peak of {peak / MB:.0f} MB"
        + ("; one dashboard following" if dashboard else ""),
    )
    data = {
        "points": acked_total,
        "seconds": elapsed,
        "rss_idle": rss_start,
        "rss_after_warmup": warm[2],
        "warmup_points": warm[1],
        "rss_peak": peak,
        "rss_final": samples[-1][2],
        "growth_mb": growth,
        "final_growth_mb": final_growth,
        "dashboard": dashboard,
        "samples": samples[:: max(1, len(samples) // 200)],
        "trainer_error": trainer.error,
        "load": machine_load,
    }
    return [check], data


def client_pass(rows: int, rate: float | None, disk_bytes: int) -> dict[str, Any]:
    """Log ``rows`` rows at ``rate`` rows/s (None: as fast as possible) to a server
    that refuses connections; sample memory every 1% of the rows."""
    url = f"http://127.0.0.1:{c.free_port()}"
    run = trainwire.init(
        project="bench",
        name=f"{NAME}-offline",
        url=url,
        token=c.TOKEN,
        max_memory_rows=10_000,
        max_disk_bytes=disk_bytes,
        system_metrics=False,  # the rows counted are the loop's own
    )
    samples: list[dict[str, float]] = []
    every = max(1, rows // 100)
    chunk = 500
    t0 = time.perf_counter()
    log = run.log
    for first in range(0, rows, chunk):
        for step in range(first, min(rows, first + chunk)):
            log({"loss": 1.0 / (step + 1), "acc": step * 1e-6, "lr": 3e-3}, step=step)
        if rate is not None:
            pause = t0 + (first + chunk) / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        if (first + chunk) % every < chunk:
            size = run.path.stat().st_size if run.path.exists() else 0
            samples.append(
                {
                    "rows": first + chunk,
                    "seconds": time.perf_counter() - t0,
                    "rss": c.rss_bytes(),
                    "queued": len(run._queue),
                    "file": size,
                }
            )
    seconds = time.perf_counter() - t0
    while run._queue and time.perf_counter() - t0 < seconds + 60:
        time.sleep(0.02)  # the sender thread's progress: polled
    file_size = run.path.stat().st_size if run.path.exists() else 0
    end = {"rss": c.rss_bytes(), "file": file_size, "queued": len(run._queue)}
    # finish() with the server still away: the sender writes what it held in memory
    # to the run file (persist). Its memory is sampled until the thread has ended.
    finish_rss = [end["rss"]]
    sender = run._sender
    started = time.perf_counter()
    sampler = threading.Thread(target=_sample_rss, args=(sender, finish_rss), daemon=True)
    sampler.start()
    run.finish(timeout=0.2)
    finish_seconds = time.perf_counter() - started
    sender.join()
    sender_seconds = time.perf_counter() - started
    sampler.join()
    kept = SpillingOutbox.open_existing(run.path)
    kept_rows = kept.rows
    kept.close()
    dropped = sender.dropped_rows + run._dropped_calls
    tenth = samples[max(0, len(samples) // 10 - 1)]
    return {
        "rows": rows,
        "rate": rate,
        "seconds": seconds,
        "rss_at_10pct": tenth["rss"],
        "rss_peak": max(s["rss"] for s in samples),
        "rss_end": end["rss"],
        "rss_peak_finishing": max(finish_rss),
        "growth_after_10pct_mb": (max(s["rss"] for s in samples) - tenth["rss"]) / MB,
        "finish_growth_mb": (max(finish_rss) - tenth["rss"]) / MB,
        "finish_seconds": finish_seconds,
        "sender_seconds": sender_seconds,
        "kept_rows": kept_rows,
        "lost_rows": rows - kept_rows - dropped,
        "max_queued": max(s["queued"] for s in samples),
        "file_peak": max([s["file"] for s in samples] + [file_size]),
        "file_end": file_size,
        "dropped_rows": dropped,
        "samples": samples,
    }


def _sample_rss(thread: threading.Thread, found: list[int]) -> None:
    """This process's RSS every 10 ms until ``thread`` has ended."""
    while thread.is_alive():
        found.append(c.rss_bytes())
        thread.join(0.01)
    found.append(c.rss_bytes())


def client_part(rows: int, disk_bytes: int, tmp: Any) -> tuple[list[c.Check], dict[str, Any]]:
    c.pin(None)
    paced = client_pass(rows, 50_000.0, disk_bytes)
    print(
        f"  client, paced at 50,000 rows/s: {rows:,} rows in {paced['seconds']:.1f} s;"
        f" RSS {paced['rss_at_10pct'] / MB:.1f} MB at 10%, peak {paced['rss_peak'] / MB:.1f} MB;"
        f" at most {paced['max_queued']:,} rows waiting for the sender; run file peak"
        f" {paced['file_peak'] / MB:.1f} MB (bound {disk_bytes / MB:.1f} MB);"
        f" {paced['dropped_rows']:,} rows dropped past the bound",
        flush=True,
    )
    for s in paced["samples"][:: max(1, len(paced["samples"]) // 10)]:
        print(
            f"    {s['rows']:>9,} rows: RSS {s['rss'] / MB:6.1f} MB, queued {s['queued']:>7,},"
            f" file {s['file'] / MB:6.1f} MB"
        )
    tight = client_pass(rows, None, disk_bytes)
    print(
        f"  client, unpaced (tight loop, not judged): {rows / tight['seconds']:,.0f} rows/s;"
        f" RSS peak {tight['rss_peak'] / MB:.1f} MB ({tight['growth_after_10pct_mb']:+.1f} MB"
        f" after 10%); up to {tight['max_queued']:,} rows waiting for the sender; run file"
        f" peak {tight['file_peak'] / MB:.1f} MB (bound {disk_bytes / MB:.1f} MB)",
        flush=True,
    )
    for label, result in (("paced", paced), ("unpaced", tight)):
        print(
            f"  {label}, finish() with the server away: returned in"
            f" {result['finish_seconds']:.2f} s, the sender ended in"
            f" {result['sender_seconds']:.2f} s (the rows it held, persisted to the run"
            f" file); RSS meanwhile up to {result['rss_peak_finishing'] / MB:.1f} MB;"
            f" of {rows:,} rows {result['kept_rows']:,} in the file,"
            f" {result['dropped_rows']:,} dropped and counted, {result['lost_rows']:,} lost",
            flush=True,
        )
    checks = [
        c.Check(
            "client RSS growth after 10% of rows, server away",
            paced["growth_after_10pct_mb"],
            "MB",
            CLIENT_TARGET_MB,
            note=f"{rows:,} rows at 50,000/s, max_memory_rows=10,000; tight loop:"
            f" {tight['growth_after_10pct_mb']:+.0f} MB",
        ),
        c.Check(
            "client run file, largest size",
            paced["file_peak"] / MB,
            "MB",
            disk_bytes / MB,
            note=f"max_disk_bytes = {disk_bytes:,} B; paced peak {paced['file_peak']:,} B"
            f" ({paced['file_peak'] - disk_bytes:+,} B); tight loop {tight['file_peak']:,} B"
            f" ({tight['file_peak'] - disk_bytes:+,} B)",
        ),
        c.Check(
            "client RSS growth to the end of finish(), server away",
            paced["finish_growth_mb"],
            "MB",
            CLIENT_TARGET_MB,
            note="finish() persists the rows held in memory to the run file; tight loop:"
            f" {tight['finish_growth_mb']:+.0f} MB",
        ),
        c.Check(
            "client rows unaccounted for: neither in the run file nor counted as dropped",
            max(abs(paced["lost_rows"]), abs(tight["lost_rows"])),  # below 0: counted twice
            "rows",
            0,
            note="after finish(), the run file read back (as `trainwire sync` does)",
        ),
    ]
    return checks, {"paced": paced, "tight": tight, "max_disk_bytes": disk_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M points; 500k client rows")
    parser.add_argument("--points", type=int, default=None, help="server points")
    parser.add_argument("--rows", type=int, default=None, help="client rows")
    parser.add_argument("--dashboard", action="store_true", help="one dashboard following")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-client", action="store_true")
    args = parser.parse_args(argv)
    points = args.points or (1_000_000 if args.quick else 10_000_000)
    rows = args.rows or (500_000 if args.quick else 3_000_000)
    # About 60 bytes a row on disk: the bound is reached about halfway through.
    disk_bytes = rows * 30
    c.header(NAME, "server RSS under ingest; client RSS with the server away", args.quick)
    checks: list[c.Check] = []
    data: dict[str, Any] = {}
    load = None
    with c.client_environment(NAME) as tmp:
        c.quiet_client_logs(tmp / "client.log")
        if not args.skip_server:
            server_checks, data["server"] = server_part(points, tmp, args.dashboard)
            checks += server_checks
            load = data["server"].pop("load")
        if not args.skip_client:
            client_checks, data["client"] = client_part(rows, disk_bytes, tmp)
            checks += client_checks
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={
            "server_points": points,
            "rows_per_batch": ROWS,
            "keys": KEYS,
            "client_rows": rows,
            "client_rate": 50_000,
            "max_memory_rows": 10_000,
            "max_disk_bytes": disk_bytes,
            "reduced_scale": points < 10_000_000,
        },
        data=data,
        load=load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
