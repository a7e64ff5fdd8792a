"""The CPU loop's slowdown from logging every step, by fine-grained turns between
processes: a wall-clock figure that the VM's drift does not swamp.

``cpu_overhead.py`` compares runs of seconds, one after another, and this VM's speed
drifts by 10-60% between such runs. Here three training processes (the same loop as
``cpu_overhead.py``, same seed) share one core and take turns of 64 steps (50-100
ms): the coordinator resumes one with SIGCONT, it trains its turn, reports the
turn's wall time and stops itself with SIGSTOP, then the next one's turn comes.
Drift slower than a round of turns hits all three alike. A stopped process does
nothing, its sender thread included, so everything trainwire costs lands in its
own turns.

Each round, one process trains plain, one logs every step with trainwire, and one
busy-waits 1% of a step every step: the calibration, a known cost measured by the
same method at the same moments. On this VM it reads 1.1 to 2 times that (extra
Python work per step costs the loop more than its own duration here, or the method
amplifies it), so trainwire's figure is printed raw and scaled by that reading.
The roles rotate every epoch (three epochs make a cycle): where a process's memory
lands moves its speed by a few percent, and the rotation cancels that bias (each
estimate is the geometric mean of the epochs' ratios of total turn time, role over
plain). The 95% intervals are bootstrapped on two levels, cycles then rounds,
resampling each round whole, so that the scaled figure keeps what its two readings
share.

Each worker runs a third of the wall time, so wall-clock timers would fire three
times as often per second of its own running: the logging process's flush pacing,
idle wait, ack reads, keepalive pings and system sampler interval are stretched to
keep them per second of its own run time (before 2026-11-28, later, the ack reads
and pings were not: three times as many, each a cold wake of the sender's socket
code). The sender thread's CPU in the logging turns is printed beside the figures.

Two loops (``cpu_overhead.LOOPS``): "loader", a DataLoader loop at the step time of
the loop the issue's anchors were measured on (1.65 ms), and "index", which slices
tensors itself and steps twice as fast, so that the same cost per step reads
double.

Usage::

    .venv/bin/python bench/cpu_lockstep.py            # both loops, 6 epochs of 300 rounds
    .venv/bin/python bench/cpu_lockstep.py --quick    # the loader loop, 3 epochs of 150
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

WORKERS = 3
ROLES = ("plain", "log", "spin")  # epoch e: worker i takes ROLES[(i + e) % 3]


def worker(url: str, loop: str) -> None:
    """Train in turns: stop, read a command, act, report, stop again. Commands:
    "plain", "log" (log every step: a run opens), "spin S" (busy-wait S seconds a
    step), each from now on (leaving "log" finishes the run); "turn" (train
    STEPS_PER_TURN steps, report their wall time)."""
    os.sched_setaffinity(0, {0})
    import torch
    from cpu_overhead import Task

    import trainwire
    from trainwire.client import sender as sender_module, system as system_module

    # Running a third of the wall time: keep the pacing per second of its own run.
    interval_for = sender_module.Sender.interval_for
    sender_module.Sender.interval_for = lambda self, rate: (  # type: ignore[method-assign]
        WORKERS * interval_for(self, WORKERS * rate)
    )
    # Every other wall-clock timer of the sender too: acks read every 0.5 s and pings
    # every 2 s of wall time would come three times as often per second of its run.
    for timer in ("IDLE_WAIT", "ACK_READ_INTERVAL", "PING_INTERVAL", "PING_TIMEOUT", "SPILL_AFTER"):
        setattr(sender_module, timer, WORKERS * getattr(sender_module, timer))
    sampler_init = system_module.SystemSampler.__init__

    def slow_sampler(self: Any, emit: Any, interval: float = 1.0) -> None:
        sampler_init(self, emit, WORKERS * interval)

    system_module.SystemSampler.__init__ = slow_sampler  # type: ignore[method-assign]
    c.quiet_client_logs(Path(os.environ["TRAINWIRE_BENCH_LOG"]))

    torch.set_num_threads(1)
    steps = Task(loop).steps()
    run: trainwire.Run | None = None
    role, spin_s = "plain", 0.0
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
        command, *argument = sys.stdin.readline().split()
        if command != "turn":
            role, spin_s = command, float(argument[0]) if argument else 0.0
            answer = "ok"
            if role == "log" and run is None:
                # The server's token, from the coordinator's environment: this process's
                # own c.TOKEN is another random one, which the server would refuse, and
                # a refused sender (retrying, spilling) is not what this bench measures.
                token = os.environ["TRAINWIRE_TOKEN"]
                run = trainwire.init(project="bench", name=NAME, url=url, token=token)
            elif role != "log" and run is not None:
                run.finish(timeout=60)
                if not run.delivered:
                    answer = "undelivered"
                run = None
            print(answer, flush=True)
            continue
        sender_started = c.thread_cpu_seconds(run._sender) if run is not None else 0.0
        started = time.perf_counter()
        if run is not None:
            for step, loss, acc, lr in itertools.islice(steps, STEPS_PER_TURN):
                run.log({"train/loss": loss, "train/acc": acc, "lr": lr}, step=step)
        elif spin_s:
            for _ in itertools.islice(steps, STEPS_PER_TURN):
                spin_until = time.perf_counter() + spin_s
                while time.perf_counter() < spin_until:
                    pass
        else:
            for _ in itertools.islice(steps, STEPS_PER_TURN):
                pass
        elapsed = time.perf_counter() - started
        # The sender's CPU in this turn: what trainwire's thread took from the loop's core.
        sender_s = c.thread_cpu_seconds(run._sender) - sender_started if run is not None else 0.0
        print(elapsed, sender_s, flush=True)


# -- the coordinator ------------------------------------------------------------------


class Worker:
    def __init__(self, url: str, loop: str, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", url, loop],
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

    def turn(self) -> tuple[float, float]:
        """One turn: its wall time, and the CPU its sender thread took in it (0 unless
        logging), in seconds."""
        elapsed, sender = self.command("turn").split()
        return float(elapsed), float(sender)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


Round = dict[str, float]  # role -> the wall time of its turn; "sender": the sender's CPU
Epochs = list[list[Round]]


def step_seconds(workers: list[Worker], turns: int) -> float:
    """The loop's step time, all plain: the calibration's busy wait is 1% of it."""
    assign(workers, None, 0.0)
    times = [w.turn()[0] for _ in range(turns) for w in workers]
    return c.median(times) / STEPS_PER_TURN


def epochs_of(workers: list[Worker], epochs: int, turns: int, spin_s: float) -> Epochs:
    """Per epoch, one Round per round of turns; the roles rotate every epoch."""
    results = []
    for epoch in range(epochs):
        roles = assign(workers, epoch, spin_s)
        for worker in workers:  # a warm-up turn each
            worker.turn()
        rounds = []
        for turn in range(turns):
            first = turn % WORKERS  # who goes first rotates too
            order = workers[first:] + workers[:first]
            round_: Round = {}
            for worker in order:
                elapsed, sender = worker.turn()
                round_[roles[id(worker)]] = elapsed
                if roles[id(worker)] == "log":
                    round_["sender"] = sender
            rounds.append(round_)
        results.append(rounds)
    assign(workers, None, spin_s)  # the last run ends, and must be delivered too
    return results


def assign(workers: list[Worker], epoch: int | None, spin_s: float) -> dict[int, str]:
    """Each worker's role for ``epoch`` (None: all plain), by id(worker)."""
    roles = {}
    for index, worker in enumerate(workers):
        role = "plain" if epoch is None else ROLES[(index + epoch) % WORKERS]
        answer = worker.command(f"spin {spin_s!r}" if role == "spin" else role)
        if answer != "ok":  # measured, a refused or cut-off sender would pass for ours
            raise RuntimeError(f"a logging worker's run was {answer}: see the client log")
        roles[id(worker)] = role
    return roles


def slowdown(epochs: Epochs, role: str) -> float:
    """``role``'s slowdown in percent: the geometric mean over epochs of the sum of its
    turn times over the plain one's, which cancels each process's own bias once each
    process has taken each role as often (whole cycles of epochs)."""
    logs = [math.log(sum(r[role] for r in e) / sum(r["plain"] for r in e)) for e in epochs]
    return (math.exp(sum(logs) / len(logs)) - 1) * 100


def sender_cpu_us(epochs: Epochs) -> float:
    """The logging process's sender thread: µs of CPU per step, over every turn."""
    turns = [r["sender"] for e in epochs for r in e]
    return sum(turns) / (len(turns) * STEPS_PER_TURN) * 1e6 if turns else math.nan


def resample(epochs: Epochs, rng: random.Random) -> Epochs:
    """One bootstrap replicate, on two levels: the cycles of epochs (whose estimates
    differ by more than their rounds' noise: a process's bias drifts), then the rounds
    within each epoch, each round whole."""
    cycles = [epochs[i : i + WORKERS] for i in range(0, len(epochs), WORKERS)]
    chosen = [rng.choice(cycles) for _ in cycles]
    return [[rng.choice(rounds) for _ in rounds] for cycle in chosen for rounds in cycle]


def interval(values: list[float]) -> tuple[float, float]:
    """The central 95% of bootstrap replicates."""
    ordered = sorted(values)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def estimates(epochs: Epochs, percent: float) -> dict[str, float]:
    """trainwire's and the calibration's slowdowns, and trainwire's scaled by what the
    known ``percent`` read, each with its 95% interval."""
    rng = random.Random(0)
    replicates: dict[str, list[float]] = {"log": [], "spin": [], "scaled": []}
    for _ in range(BOOTSTRAP):
        sample = resample(epochs, rng)
        logged, known = slowdown(sample, "log"), slowdown(sample, "spin")
        replicates["log"].append(logged)
        replicates["spin"].append(known)
        if known > 0:
            replicates["scaled"].append(logged * percent / known)
    known = slowdown(epochs, "spin")
    found = {
        "log": slowdown(epochs, "log"),
        "spin": known,
        "scaled": slowdown(epochs, "log") * percent / known if known > 0 else math.nan,
    }
    result: dict[str, float] = {}
    for key, value in found.items():
        low, high = interval(replicates[key]) if replicates[key] else (math.nan, math.nan)
        result |= {key: value, f"{key}_low": low, f"{key}_high": high}
    return result


def measure_loop(
    server: c.ServerProcess, loop: str, epochs: int, turns: int, log: Path
) -> tuple[c.Check, dict[str, Any]]:
    """trainwire's slowdown of ``loop``, and a known cost's, by the same turns."""
    workers = [Worker(server.url, loop, log) for _ in range(WORKERS)]
    try:
        step_s = step_seconds(workers, 20)
        spin_s = step_s * CALIBRATION_PERCENT / 100
        print(
            f"  {loop} loop (batch {LOOPS[loop]}): {step_s * 1e6:.0f} µs a step;"
            f" calibration: a busy wait of {spin_s * 1e6:.1f} µs a step",
            flush=True,
        )
        results = epochs_of(workers, epochs, turns, spin_s)
    finally:
        for worker in workers:
            worker.close()
    found = estimates(results, CALIBRATION_PERCENT)
    for role, what in (("log", "trainwire"), ("spin", f"a known {CALIBRATION_PERCENT:g}%")):
        per_epoch = [slowdown([e], role) for e in results]
        print(
            f"    {what}: {found[role]:+.2f}% raw (95% interval {found[role + '_low']:+.2f}"
            f" to {found[role + '_high']:+.2f}); per epoch"
            f" {', '.join(f'{x:+.2f}%' for x in per_epoch)}",
            flush=True,
        )
    print(
        f"    trainwire scaled by the calibration: {found['scaled']:+.2f}% (95% interval"
        f" {found['scaled_low']:+.2f} to {found['scaled_high']:+.2f})",
        flush=True,
    )
    sender_us = sender_cpu_us(results)
    print(f"    trainwire's sender thread: {sender_us:.1f} µs of CPU a step", flush=True)
    # The verdict's noise: the side of the interval that faces the target, so that a
    # pass or a shortfall is called only when the whole interval is clear of it.
    if found["scaled"] > TARGET_PERCENT:
        half_width = found["scaled"] - found["scaled_low"]
    else:
        half_width = found["scaled_high"] - found["scaled"]
    check = c.Check(
        f"{loop} loop slowdown, turns, scaled by calibration",
        found["scaled"],
        "%",
        TARGET_PERCENT,
        note=f"raw {found['log']:+.2f}% ({found['log_low']:+.2f} to {found['log_high']:+.2f});"
        f" a known {CALIBRATION_PERCENT:g}% reads {found['spin']:+.2f}%"
        f" ({found['spin_low']:+.2f} to {found['spin_high']:+.2f}); {step_s * 1e6:.0f} µs a step",
        noise=half_width,
    )
    return check, found | {
        "step_us": step_s * 1e6,
        "spin_us": spin_s * 1e6,
        "sender_cpu_us": sender_us,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs of 150 rounds")
    parser.add_argument("--epochs", type=int, default=None, help="role rotations (default 6)")
    parser.add_argument("--turns", type=int, default=None, help="rounds per epoch (300)")
    parser.add_argument(
        "--loop",
        choices=[*sorted(LOOPS), "all"],
        default=None,
        help=f"the loop (cpu_overhead.LOOPS); default: all, quick: {DEFAULT_LOOP}",
    )
    args = parser.parse_args(argv)
    loop = args.loop or (DEFAULT_LOOP if args.quick else "all")
    loops = [DEFAULT_LOOP, *sorted(set(LOOPS) - {DEFAULT_LOOP})] if loop == "all" else [loop]
    epochs = args.epochs or (3 if args.quick else 6)
    turns = args.turns or (150 if args.quick else 300)
    if epochs % WORKERS:
        parser.error(f"--epochs must be a multiple of {WORKERS}: every process takes every role")
    cpus = os.cpu_count() or 1
    if cpus < 2 or not hasattr(os, "sched_setaffinity"):
        print("needs 2 CPUs and Linux (sched_setaffinity)")
        return 1
    c.header(NAME, "training-loop slowdown, three processes taking turns on one core", args.quick)
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
        worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(main())
