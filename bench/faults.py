"""kill -9 the trainwire server at random moments of training runs; count what is lost.

Each trial starts ``python -m trainwire serve`` on a fixed port, trains (a stand-in
step of about a millisecond, then ``run.log({"x": step}, step=step)``) for
``--steps`` steps, and meanwhile kills the server with SIGKILL ``--kills`` times at
random steps, restarting it on the same port each time. After ``run.finish()`` the
server is stopped and its SQLite file is read back.

What is measured, per trial:

- logged: the steps the trainer logged.
- stored: the points in the database afterwards (for the one key logged).
- lost: logged steps missing from the database.
- duplicated: points stored more than once.
- downtime: from the kill to the restarted server answering ``GET /api/health``.
- recovery: from that answer until the server has stored every step the trainer had
  logged by then, as read through the REST API (``/api/runs/{id}/metrics``), polled
  every 20 ms: it includes the client's reconnect backoff and the replay of its
  backlog. The next kill waits until recovery ends, so recoveries never overlap.

Target: 0 lost, 0 duplicated, in every trial. The table says whether it is met;
the exit status is 0 if so, 1 if not. Results go to ``bench/results/faults.json``;
the client's log to ``bench/results/faults.log``, and the server logs of any trial
that falls short next to it.

Usage, from the repository root::

    .venv/bin/python bench/faults.py            # 20 trials
    .venv/bin/python bench/faults.py --quick    # 3 trials
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import _common as c  # bench/ is on sys.path when a bench runs as a script

import trainwire
from trainwire.storage import SQLiteStore

RESULTS: Final = Path(__file__).resolve().parent / "results"
TARGET: Final = "0 lost, 0 duplicated"
POLL: Final = 0.02  # seconds between polls of the REST API while recovering
RECOVERY_TIMEOUT: Final = 60.0
FINISH_TIMEOUT: Final = 60.0

_WORK = bytes(1 << 20)


def train_step() -> None:
    # About a millisecond of native code that releases the GIL, as a torch step
    # does: the sender thread runs beside it, and the run lasts long enough to be
    # hit mid-stream.
    hashlib.sha256(_WORK).digest()


def http_get(server: c.ServerProcess, path: str, timeout: float = 5.0) -> Any:
    """GET a JSON document from the server; None if it does not answer (yet)."""
    return c.http_get(server.url, path, server.token, timeout)


@dataclass
class Kill:
    at_step: int  # the step that triggered it
    trainer_step: int  # the step the trainer was at when the kill was sent
    downtime: float
    recovery: float | None  # None: not recovered within RECOVERY_TIMEOUT


@dataclass
class Trial:
    trial: int
    seed: int
    run_id: str = ""
    logged: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: bool = False
    delivered: bool = False
    status: str | None = None
    integrity: str = ""
    seconds: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    error: str | None = None

    @property
    def longest_recovery(self) -> float | None:
        times = [k.recovery for k in self.kills]
        if any(t is None for t in times):
            return None
        return max((t for t in times if t is not None), default=0.0)

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.lost == 0
            and self.duplicated == 0
            and not self.out_of_order
            and self.delivered
            and self.integrity == "ok"
        )


class Killer(threading.Thread):
    """Kills the server when the trainer reaches each chosen step, restarts it, and
    times its recovery; the trainer never waits for it."""

    def __init__(
        self, server: c.ServerProcess, at_steps: list[int], run_id: str, trial: Trial
    ) -> None:
        super().__init__(name="killer", daemon=True)
        self.server = server
        self.at_steps = at_steps
        self.run_id = run_id
        self.trial = trial
        self.logged = 0  # steps logged so far, written by the trainer
        self._reached = {step: threading.Event() for step in at_steps}
        self.error: BaseException | None = None

    def step_logged(self, step: int) -> None:
        self.logged = step + 1
        event = self._reached.get(step)
        if event is not None:
            event.set()

    def run(self) -> None:
        try:
            for step in self.at_steps:
                self._reached[step].wait()
                trainer_step = self.logged - 1
                killed = time.monotonic()
                self.server.kill()
                self.server.start()
                ready = time.monotonic()
                target = self.logged  # everything logged before the server was back
                recovered = self._wait_stored(target)
                self.trial.kills.append(
                    Kill(
                        at_step=step,
                        trainer_step=trainer_step,
                        downtime=ready - killed,
                        recovery=None if recovered is None else recovered - ready,
                    )
                )
        except BaseException as exc:  # reported with the trial
            self.error = exc

    def _wait_stored(self, count: int) -> float | None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        path = f"/api/runs/{self.run_id}/metrics?keys=x"
        while time.monotonic() < deadline:
            metrics = http_get(self.server, path)
            series = (metrics or {}).get("series", {})
            if len(series.get("x", {}).get("step", [])) >= count:
                return time.monotonic()
            time.sleep(POLL)  # another process's database: nothing to wait on
        return None


def run_trial(number: int, seed: int, steps: int, kills: int, workdir: Path) -> Trial:
    trial = Trial(trial=number, seed=seed)
    rng = random.Random(seed)
    margin = max(1, steps // 20)
    at_steps = sorted(rng.sample(range(margin, steps - margin), kills))
    # The client's run file (its spill while the server is down) goes here too.
    os.environ["TRAINWIRE_DATA"] = str(workdir / "client")
    server = c.ServerProcess(workdir / "server", port=c.free_port())
    started = time.monotonic()
    run: trainwire.Run | None = None
    try:
        server.start()
        run = trainwire.init(
            project="bench-faults",
            name=f"trial-{number}",
            url=server.url,
            token=server.token,
            flush_interval=0.005,
        )
        trial.run_id = run.id
        killer = Killer(server, at_steps, run.id, trial)
        killer.start()
        for step in range(steps):
            train_step()
            run.log({"x": float(step)}, step=step)
            killer.step_logged(step)
        trial.logged = steps
        killer.join()
        if killer.error is not None:
            raise killer.error
        run.finish(timeout=FINISH_TIMEOUT)
        trial.delivered = run.delivered
        server.stop()
        store = SQLiteStore(server.data_dir / "trainwire.db")
        try:
            series = store.metrics(run.id, ["x"])[1].get("x")
            stored = series.step if series is not None else []
            info = store.get_run(run.id)
            trial.status = None if info is None else info.status
            trial.integrity = store.integrity_check()
        finally:
            store.close()
        trial.stored = len(stored)
        trial.lost = len(set(range(steps)) - set(stored))
        trial.duplicated = sum(n - 1 for n in Counter(stored).values() if n > 1)
        trial.out_of_order = stored != sorted(stored)
    except Exception as exc:  # a trial that breaks is a result, not a crash of the bench
        trial.error = f"{type(exc).__name__}: {exc}"
    finally:
        if run is not None:
            run.finish(timeout=1.0)  # a trial that broke: stop its sender (idempotent)
        server.stop()
        trial.seconds = time.monotonic() - started
    return trial


def fmt_seconds(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.3f} s"


def print_table(trials: list[Trial]) -> None:
    header = (
        f"{'trial':>5} {'logged':>7} {'stored':>7} {'lost':>5} {'dup':>4} {'kills':>5}"
        f" {'longest downtime':>17} {'longest recovery':>17} {'integrity':>9}  result"
    )
    print(header)
    print("-" * len(header))
    for t in trials:
        downtime = max((k.downtime for k in t.kills), default=0.0)
        print(
            f"{t.trial:>5} {t.logged:>7} {t.stored:>7} {t.lost:>5} {t.duplicated:>4}"
            f" {len(t.kills):>5} {fmt_seconds(downtime):>17} {fmt_seconds(t.longest_recovery):>17}"
            f" {t.integrity or '-':>9}  {'ok' if t.ok else 'FALLS SHORT'}"
            + (f" ({t.error})" if t.error else "")
        )


def summarize(trials: list[Trial]) -> dict[str, Any]:
    recoveries = [k.recovery for t in trials for k in t.kills]
    return {
        "trials": len(trials),
        "logged": sum(t.logged for t in trials),
        "stored": sum(t.stored for t in trials),
        "lost": sum(t.lost for t in trials),
        "duplicated": sum(t.duplicated for t in trials),
        "kills": len(recoveries),
        # The rest landed after the last step, while the client still delivered.
        "kills_while_training": sum(
            1 for t in trials for k in t.kills if k.trainer_step < t.logged - 1
        ),
        "longest_downtime_s": max((k.downtime for t in trials for k in t.kills), default=0.0),
        "longest_recovery_s": (
            None
            if None in recoveries
            else max((r for r in recoveries if r is not None), default=0.0)
        ),
        "failed_trials": [t.trial for t in trials if not t.ok],
        "target": TARGET,
        "met": all(t.ok for t in trials),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="3 trials")
    parser.add_argument("--steps", type=int, default=5000, help="steps per trial (%(default)s)")
    parser.add_argument("--kills", type=int, default=3, help="kills per trial (%(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="first trial's seed (%(default)s)")
    args = parser.parse_args(argv)
    trials_wanted = 3 if args.quick else args.trials
    if args.steps < 40 or not 0 < args.kills <= args.steps // 2:
        parser.error("need --steps >= 40 and 0 < --kills <= steps / 2")

    RESULTS.mkdir(parents=True, exist_ok=True)
    # The client warns on every outage ("unreachable; retrying"): keep the table
    # readable and the warnings in a file.
    logging.basicConfig(
        filename=RESULTS / "faults.log",
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    print(
        f"kill -9 bench: {trials_wanted} trials x {args.steps} steps, {args.kills} kills each"
        f" (python {platform.python_version()}, {os.cpu_count()} CPUs)"
    )
    trials: list[Trial] = []
    started = time.monotonic()
    for number in range(1, trials_wanted + 1):
        with tempfile.TemporaryDirectory(prefix="trainwire-bench-") as tmp:
            trial = run_trial(number, args.seed + number - 1, args.steps, args.kills, Path(tmp))
            if not trial.ok:  # keep the server logs of a trial that fell short
                for log in (Path(tmp) / "server").glob("server*.out"):
                    shutil.copy(log, RESULTS / f"faults-trial{number}-{log.name}")
        trials.append(trial)
        print(
            f"  trial {number}: {trial.seconds:.1f} s, lost {trial.lost},"
            f" duplicated {trial.duplicated}" + (f", {trial.error}" if trial.error else ""),
            flush=True,
        )
    print()
    print_table(trials)
    summary = summarize(trials)
    print()
    print(
        f"total: {summary['logged']} logged, {summary['stored']} stored, {summary['lost']} lost,"
        f" {summary['duplicated']} duplicated over {summary['kills']} kills"
        f" ({summary['kills_while_training']} while training);"
        f" longest recovery {fmt_seconds(summary['longest_recovery_s'])},"
        f" longest downtime {fmt_seconds(summary['longest_downtime_s'])}"
        f" ({time.monotonic() - started:.0f} s)"
    )
    print(f"target {TARGET}: {'PASS' if summary['met'] else 'FALLS SHORT'}")
    result = {
        "bench": "faults",
        "params": {
            "trials": trials_wanted,
            "steps": args.steps,
            "kills": args.kills,
            "seed": args.seed,
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "trainwire": trainwire.__version__,
        },
        "summary": summary,
        "trials": [
            asdict(t) | {"longest_recovery_s": t.longest_recovery, "ok": t.ok} for t in trials
        ],
    }
    out = RESULTS / "faults.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
