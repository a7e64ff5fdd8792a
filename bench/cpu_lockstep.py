"""The CPU loop's slowdown from logging every step, by fine-grained turns between two
processes: a wall-clock figure that the VM's drift does not swamp.

``cpu_overhead.py`` compares runs of seconds, one after another, and this VM's speed
drifts by 10-60% between such runs. Here two training processes (the same loop as
``cpu_overhead.py``, same seed) share one core and take turns of 64 steps (about
50 ms): the coordinator resumes one with SIGCONT, it trains its turn, reports the
turn's wall time and stops itself with SIGSTOP, then the other's turn comes. Drift
slower than a turn hits both alike. A stopped process does nothing, its sender
thread included, so everything trainwire costs lands in its own turns.

Which process logs is swapped every epoch (A logs while B does not, then B while A
does not): where a process's memory lands moves its speed by a few percent, and
the swap cancels that bias (the estimate is the geometric mean of the epochs'
ratios of total turn time, logging over not).

Each worker runs half the wall time, so wall-clock timers would fire twice as often
per second of its own running: the logging process's flush pacing, idle wait and
system sampler interval are doubled to keep them per second of its own run time.

Calibration: the same method measures a known cost, a busy wait of 1% of a step
added to every step of the "logging" process. On this VM it reads 1.3 to 2 times that:
extra Python work per step costs the loop more than its own duration here (or the
method amplifies it). The figure is printed raw and scaled by that reading.

Two loops (``cpu_overhead.LOOPS``): "loader", a DataLoader loop at the step time of
the loop the issue's anchors were measured on (1.65 ms), and "index", which slices
tensors itself and steps twice as fast, so that the same cost per step reads
double. Each is measured with its own calibration.

Usage::

    .venv/bin/python bench/cpu_lockstep.py            # both loops, 4 epochs of 300 turns
    .venv/bin/python bench/cpu_lockstep.py --quick    # the loader loop, 2 epochs of 150
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c
from cpu_overhead import DEFAULT_LOOP, LOOPS

NAME = "cpu_lockstep"
TARGET_PERCENT = 1.0
STEPS_PER_TURN = 64
CALIBRATION_PERCENT = 1.0
BOOTSTRAP = 500


# -- a worker: one training process, driven by its stdin ---------------------------


def worker(url: str, mode: str, loop: str) -> None:
    """Train in turns: stop, read a command, act, report, stop again. Commands: "log S"
    (log from now on: open a run, or, calibrating, busy-wait S seconds a step),
    "plain" (stop logging: finish the run), "turn" (train STEPS_PER_TURN steps)."""
    os.sched_setaffinity(0, {0})
    import torch
    from cpu_overhead import Task

    import trainwire
    from trainwire.client import sender as sender_module, system as system_module

    # Running half the wall time: keep the pacing per second of this process's own run.
    interval_for = sender_module.Sender.interval_for
    sender_module.Sender.interval_for = lambda self, rate: 2 * interval_for(self, 2 * rate)  # type: ignore[method-assign]
    sender_module.IDLE_WAIT = 2 * sender_module.IDLE_WAIT  # type: ignore[misc]
    sampler_init = system_module.SystemSampler.__init__

    def slow_sampler(self: Any, emit: Any, interval: float = 1.0) -> None:
        sampler_init(self, emit, 2 * interval)

    system_module.SystemSampler.__init__ = slow_sampler  # type: ignore[method-assign]
    c.quiet_client_logs(Path(os.environ["TRAINWIRE_BENCH_LOG"]))

    torch.set_num_threads(1)
    steps = Task(loop).steps()
    run: trainwire.Run | None = None
    logging_on = False
    spin_s = 0.0
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
        command, *argument = sys.stdin.readline().split()
        if command in ("log", "plain"):
            logging_on = command == "log"
            spin_s = float(argument[0]) if argument else 0.0
            answer = "ok"
            if mode == "trainwire" and logging_on and run is None:
                # The server's token, from the coordinator's environment: this process's
                # own c.TOKEN is another random one, which the server would refuse, and
                # a refused sender (retrying, spilling) is not what this bench measures.
                token = os.environ["TRAINWIRE_TOKEN"]
                run = trainwire.init(project="bench", name=NAME, url=url, token=token)
            elif run is not None and not logging_on:
                run.finish(timeout=60)
                if not run.delivered:
                    answer = "undelivered"
                run = None
            print(answer, flush=True)
            continue
        started = time.perf_counter()
        for step, loss, acc, lr in itertools.islice(steps, STEPS_PER_TURN):
            if logging_on:
                if run is not None:
                    run.log({"train/loss": loss, "train/acc": acc, "lr": lr}, step=step)
                else:  # calibration: a known cost
                    spin_until = time.perf_counter() + spin_s
                    while time.perf_counter() < spin_until:
                        pass
        print(time.perf_counter() - started, flush=True)


# -- the coordinator ------------------------------------------------------------------


class Worker:
    def __init__(self, url: str, mode: str, loop: str, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", url, mode, loop],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, TRAINWIRE_BENCH_LOG=str(log)),
        )
        self._stopped()

    def _stopped(self) -> None:
        _, status = os.waitpid(self.process.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"worker {self.process.pid} ended (status {status})")

    def command(self, line: str) -> str:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(line + "\n")
        stdin.flush()
        os.kill(self.process.pid, signal.SIGCONT)
        answer = stdout.readline().strip()
        self._stopped()
        return answer

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def epochs_of(
    workers: list[Worker], epochs: int, turns: int, spin_s: float
) -> list[list[tuple[float, float]]]:
    """Per epoch, (plain, logging) turn times in pairs; who logs swaps every epoch."""
    results = []
    for epoch in range(epochs):
        logging = epoch % 2
        roles(workers, logging, spin_s)
        for worker in workers:  # a warm-up turn each
            worker.command("turn")
        pairs = []
        for turn in range(turns):
            order = workers if turn % 2 == 0 else workers[::-1]  # who goes first alternates
            times = {id(w): float(w.command("turn")) for w in order}
            pairs.append((times[id(workers[1 - logging])], times[id(workers[logging])]))
        results.append(pairs)
    roles(workers, None, spin_s)  # the last run ends, and must be delivered too
    return results


def roles(workers: list[Worker], logging: int | None, spin_s: float) -> None:
    """Worker ``logging`` logs from now on, the others not (a run they had ends)."""
    for index, worker in enumerate(workers):
        answer = worker.command(f"log {spin_s!r}" if index == logging else "plain")
        if answer != "ok":  # measured, a refused or cut-off sender would pass for ours
            raise RuntimeError(f"a logging worker's run was {answer}: see the client log")


Epochs = list[list[tuple[float, float]]]  # per epoch, (plain, logging) turn times


def slowdown(epochs: Epochs) -> float:
    """The slowdown in percent: the geometric mean over epochs of sum(logging) /
    sum(plain), which cancels each process's own bias (who logs swaps every epoch)."""
    logs = [math.log(sum(b for _, b in e) / sum(a for a, _ in e)) for e in epochs]
    return (math.exp(sum(logs) / len(logs)) - 1) * 100


def resample(epochs: Epochs, rng: random.Random) -> Epochs:
    """One bootstrap replicate, on two levels: the role swaps (pairs of epochs, whose
    estimates differ by more than their turns' noise: a process's bias drifts), then
    the turns within each epoch."""
    swaps = [epochs[i : i + 2] for i in range(0, len(epochs), 2)]
    chosen = [rng.choice(swaps) for _ in swaps]
    return [[rng.choice(pairs) for _ in pairs] for swap in chosen for pairs in swap]


def interval(values: list[float]) -> tuple[float, float]:
    """The central 95% of bootstrap replicates."""
    ordered = sorted(values)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def scaled_interval(
    logged: Epochs, calibrated: Epochs, percent: float
) -> tuple[float, float, float]:
    """trainwire's slowdown scaled by what a known ``percent`` read, with a 95%
    interval that carries the uncertainty of both measurements."""
    rng = random.Random(1)
    replicates = []
    for _ in range(BOOTSTRAP):
        known = slowdown(resample(calibrated, rng))
        if known > 0:
            replicates.append(slowdown(resample(logged, rng)) * percent / known)
    known = slowdown(calibrated)
    value = slowdown(logged) * percent / known if known > 0 else math.nan
    return (value, *interval(replicates)) if replicates else (value, math.nan, math.nan)


def measure(
    workers: list[Worker], mode: str, spin_s: float, epochs: int, turns: int
) -> dict[str, Any]:
    results = epochs_of(workers, epochs, turns, spin_s)
    rng = random.Random(0)
    value = slowdown(results)
    low, high = interval([slowdown(resample(results, rng)) for _ in range(BOOTSTRAP)])
    per_epoch = [
        (sum(b for _, b in pairs) / sum(a for a, _ in pairs) - 1) * 100 for pairs in results
    ]
    step_us = c.median([a for pairs in results for a, _ in pairs]) / STEPS_PER_TURN * 1e6
    print(
        f"  {mode}: {value:+.2f}% (95% interval {low:+.2f} to {high:+.2f}); per epoch"
        f" {', '.join(f'{x:+.2f}%' for x in per_epoch)}; {step_us:.0f} µs/step",
        flush=True,
    )
    return {
        "percent": value,
        "low": low,
        "high": high,
        "per_epoch": per_epoch,
        "step_us": step_us,
        "epochs": results,
    }


def measure_loop(
    server: c.ServerProcess, loop: str, epochs: int, turns: int, log: Path
) -> tuple[c.Check, dict[str, Any]]:
    """trainwire's slowdown of ``loop``, and a known cost's by the same method."""
    step_ms = {"loader": "1.4-1.6", "index": "0.75-0.9"}.get(loop, "?")
    print(f"  {loop} loop (batch {LOOPS[loop]}, {step_ms} ms a step here):", flush=True)
    pairs = {
        mode: [Worker(server.url, mode, loop, log) for _ in range(2)]
        for mode in ("trainwire", "calibration")
    }
    try:
        trainwire_run = measure(pairs["trainwire"], "trainwire", 0.0, epochs, turns)
        spin_s = trainwire_run["step_us"] * 1e-6 * CALIBRATION_PERCENT / 100
        calibration = measure(pairs["calibration"], "calibration", spin_s, epochs, turns)
    finally:
        for worker in (w for ws in pairs.values() for w in ws):
            worker.close()
    scaled, low, high = scaled_interval(
        trainwire_run.pop("epochs"), calibration.pop("epochs"), CALIBRATION_PERCENT
    )
    # The verdict's noise: the wider side of the interval, so that "pass" and "falls
    # short" both need the interval clear of the target.
    half_width = max(scaled - low, high - scaled)
    print(
        f"    a known {CALIBRATION_PERCENT:g}% ({spin_s * 1e6:.1f} µs a step) reads as"
        f" {calibration['percent']:+.2f}%: trainwire's {trainwire_run['percent']:+.2f}%"
        f" scales to {scaled:+.2f}% (95% interval {low:+.2f} to {high:+.2f}, both"
        " measurements' noise)",
        flush=True,
    )
    check = c.Check(
        f"{loop} loop slowdown, turns, scaled by calibration",
        scaled,
        "%",
        TARGET_PERCENT,
        note=f"raw {trainwire_run['percent']:+.2f}% ({trainwire_run['low']:+.2f} to"
        f" {trainwire_run['high']:+.2f}); a known {CALIBRATION_PERCENT:g}% reads"
        f" {calibration['percent']:+.2f}%; {trainwire_run['step_us']:.0f} µs a step",
        noise=half_width,
    )
    return check, {
        "trainwire": trainwire_run,
        "calibration": calibration,
        "scaled": scaled,
        "scaled_low": low,
        "scaled_high": high,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs of 150 turns")
    parser.add_argument("--epochs", type=int, default=None, help="role swaps (default 4)")
    parser.add_argument("--turns", type=int, default=None, help="turns per epoch (300)")
    parser.add_argument(
        "--loop",
        choices=[*sorted(LOOPS), "all"],
        default=None,
        help=f"the loop (cpu_overhead.LOOPS); default: all, quick: {DEFAULT_LOOP}",
    )
    args = parser.parse_args(argv)
    loop = args.loop or (DEFAULT_LOOP if args.quick else "all")
    loops = [DEFAULT_LOOP, *sorted(set(LOOPS) - {DEFAULT_LOOP})] if loop == "all" else [loop]
    epochs = args.epochs or (2 if args.quick else 4)
    turns = args.turns or (150 if args.quick else 300)
    if epochs % 2:
        parser.error("--epochs must be even: each process logs in half of them")
    cpus = os.cpu_count() or 1
    if cpus < 2 or not hasattr(os, "sched_setaffinity"):
        print("needs 2 CPUs and Linux (sched_setaffinity)")
        return 1
    c.header(NAME, "training-loop slowdown, two processes taking turns on one core", args.quick)
    os.sched_setaffinity(0, {cpus - 1})
    checks: list[c.Check] = []
    data: dict[str, Any] = {}
    with c.client_environment(NAME) as tmp:
        server = c.ServerProcess(tmp / "server", cpus={cpus - 1})
        with server:
            load = c.MachineLoad([server.pid])
            for loop in loops:
                check, data[loop] = measure_loop(server, loop, epochs, turns, tmp / "client.log")
                checks.append(check)
            machine_load = load.stop()
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={"epochs": epochs, "turns": turns, "steps_per_turn": STEPS_PER_TURN, "loops": loops},
        data=data,
        load=machine_load,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(main())
