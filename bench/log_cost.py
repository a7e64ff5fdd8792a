"""What one ``run.log()`` call costs the training thread, with a server connected.

Target: ``run.log()`` of a dict of three Python floats takes a median of at most
2 µs and a p99 of at most 20 µs per call, over 100,000 calls.

The server is a real one (``python -m trainwire serve`` in its own process, as the
auto-started local server is); the run's sender thread is connected and delivering
while the calls are timed. Each call is timed on its own with ``perf_counter_ns``;
the metrics dict is built outside the timed region, as a training loop builds it
before the call. In the same run, interleaved with the ``log()`` blocks, the same
harness times a bare ``list.append(metrics)`` (the floor: what any call that keeps
the dict costs, timer included), and the ratio of the two medians is reported.

The calls are back to back (a tight loop), the hardest case for the hot path: the
sender thread converts and sends what the loop logs while the loop goes on.

Usage::

    .venv/bin/python bench/log_cost.py            # 5 rounds of 100,000 calls
    .venv/bin/python bench/log_cost.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import gc
import time
from array import array
from typing import Any

import _common as c

import trainwire

NAME = "log_cost"
MEDIAN_TARGET_US = 2.0
P99_TARGET_US = 20.0


def timed_blocks(
    run: trainwire.Run, calls: int, blocks: int, first_step: int
) -> tuple[array[int], array[int]]:
    """``calls`` timed log() calls and as many timed list appends, in alternating
    blocks. Returns the nanoseconds of each, in call order."""
    per_block = calls // blocks
    log_ns = array("q", bytes(8 * per_block * blocks))
    base_ns = array("q", bytes(8 * per_block * blocks))
    log = run.log
    clock = time.perf_counter_ns
    sink: list[dict[str, float]] = []
    append = sink.append
    step = first_step
    for block in range(blocks):
        offset = block * per_block
        for i in range(per_block):
            metrics = {"loss": 1.0 / (step + 1), "acc": step * 1e-6, "lr": 3e-3}
            t0 = clock()
            log(metrics, step=step)
            t1 = clock()
            log_ns[offset + i] = t1 - t0
            step += 1
        for i in range(per_block):
            metrics = {"loss": 1.0 / (step + 1), "acc": step * 1e-6, "lr": 3e-3}
            t0 = clock()
            append(metrics)
            t1 = clock()
            base_ns[offset + i] = t1 - t0
        sink.clear()
    return log_ns, base_ns


def timer_floor(samples: int = 100_000) -> float:
    """Median nanoseconds between two back-to-back perf_counter_ns() calls."""
    clock = time.perf_counter_ns
    values = []
    for _ in range(samples):
        t0 = clock()
        t1 = clock()
        values.append(t1 - t0)
    return c.median(values)


def wait_delivered(run: trainwire.Run, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while not run.delivered:
        if time.monotonic() - started > timeout:
            break
        time.sleep(0.005)  # another thread's progress: polled
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round instead of 5")
    parser.add_argument("--calls", type=int, default=100_000, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    parser.add_argument("--blocks", type=int, default=10, help="A/B blocks per round")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    c.header(NAME, "cost of run.log() on the training thread", args.quick)

    with c.client_environment(NAME) as tmp, c.ServerProcess(tmp / "server") as server:
        c.quiet_client_logs(tmp / "client.log")
        run = trainwire.init(project="bench", name=NAME, url=server.url, token=c.TOKEN)
        run.log({"loss": 1.0, "acc": 0.0, "lr": 3e-3}, step=0)
        connect_s = wait_delivered(run)
        step = 1
        # Warm-up: the interpreter's caches, the allocator, the sender's first batches.
        timed_blocks(run, 10_000, 1, step)
        step += 10_000
        wait_delivered(run)
        floor_ns = timer_floor()

        log_all: list[int] = []
        base_all: list[int] = []
        per_round: list[dict[str, Any]] = []
        gc_before = sum(s["collections"] for s in gc.get_stats())
        load = c.MachineLoad([server.pid])
        for number in range(1, rounds + 1):
            log_ns, base_ns = timed_blocks(run, args.calls, args.blocks, step)
            step += len(log_ns)
            backlog = len(run._queue)  # rows the sender had yet to take at the end
            drain_s = wait_delivered(run)
            log_us = sorted(v / 1000 for v in log_ns)
            base_us = sorted(v / 1000 for v in base_ns)
            entry: dict[str, Any] = {
                "round": number,
                "log_us": c.distribution(log_us),
                "append_us": c.distribution(base_us),
                "backlog_rows_at_end": backlog,
                "seconds_to_deliver_after": drain_s,
            }
            per_round.append(entry)
            print(
                f"  round {number}: log() median {c.fmt(entry['log_us']['p50'])} µs,"
                f" p99 {c.fmt(entry['log_us']['p99'])} µs, max {c.fmt(entry['log_us']['max'])} µs;"
                f" append median {c.fmt(entry['append_us']['p50'])} µs;"
                f" sender backlog {backlog} rows, delivered {drain_s:.2f} s later",
                flush=True,
            )
            log_all.extend(log_ns)
            base_all.extend(base_ns)
        gc_collections = sum(s["collections"] for s in gc.get_stats()) - gc_before
        machine_load = load.stop()
        total_logged = step
        run.finish(timeout=60)
        delivered = run.delivered
        answer = c.http_get(server.url, f"/api/runs/{run.id}/metrics?keys=loss")
        stored = answer["series"] if answer else None
        stored_rows = len(stored["loss"]["step"]) if stored and "loss" in stored else None

    log_us = sorted(v / 1000 for v in log_all)
    base_us = sorted(v / 1000 for v in base_all)
    log_median = c.percentile(log_us, 50, is_sorted=True)
    log_p99 = c.percentile(log_us, 99, is_sorted=True)
    base_median = c.percentile(base_us, 50, is_sorted=True)
    over_20 = sum(1 for v in log_us if v > P99_TARGET_US) / len(log_us)
    ratio = log_median / base_median if base_median else float("nan")
    print()
    print(
        f"  {len(log_us):,} timed log() calls; bare list.append baseline median"
        f" {c.fmt(base_median)} µs (log/append = {ratio:.1f}x); timer floor {floor_ns:.0f} ns;"
        f" calls over 20 µs: {over_20:.4%}; max {c.fmt(log_us[-1])} µs"
    )
    print(
        f"  {total_logged:,} rows logged, {stored_rows} stored, delivered: {delivered};"
        f" {gc_collections} GC collections during the timed rounds"
    )
    checks = [
        c.Check(
            "run.log() median per call",
            log_median,
            "µs",
            MEDIAN_TARGET_US,
            note=f"bare append {c.fmt(base_median)} µs; ratio {ratio:.1f}x",
        ),
        c.Check(
            "run.log() p99 per call",
            log_p99,
            "µs",
            P99_TARGET_US,
            note=f"{over_20:.3%} of calls over 20 µs; max {c.fmt(log_us[-1])} µs",
        ),
    ]
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={"calls_per_round": args.calls, "rounds": rounds, "blocks": args.blocks},
        data={
            "log_us": c.distribution(log_us),
            "append_us": c.distribution(base_us),
            "ratio_of_medians": ratio,
            "timer_floor_ns": floor_ns,
            "fraction_over_20us": over_20,
            "rounds": per_round,
            "connect_s": connect_s,
            "rows_logged": total_logged,
            "rows_stored": stored_rows,
            "delivered": delivered,
            "gc_collections": gc_collections,
        },
        load=machine_load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
