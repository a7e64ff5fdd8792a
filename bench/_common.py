"""What every benchmark in ``bench/`` shares.

- :class:`Check` and :func:`report`: one line per target (figure, target, ``pass`` or
  ``falls short``) and ``bench/results/<name>.json``.
- :class:`ServerProcess` (``python -m trainwire serve --port 0 --token T``, optionally
  pinned to CPUs) and :class:`ServerThread` (uvicorn in a thread of this process, on a
  port-0 socket bound before it starts, as ``tests/conftest.py`` does).
- :func:`interleaved`: A/B/A/B repetitions; :func:`percentile`, :func:`median`,
  :func:`spread`.
- :func:`rss_bytes`, :func:`cpu_seconds`: a process's memory and CPU time, from /proc.

Benchmarks are measurements, not tests: nothing here fails because something is slow.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
RESULTS: Final = BENCH / "results"

# The admin token of every server a benchmark starts; clients send it as a Bearer token.
TOKEN: Final = secrets.token_urlsafe(24)

PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT: Final = 30.0
# Debian's Chromium, driven by Playwright (which downloads nothing here), with the
# flags of tests/conftest.py (tests do not import bench/, so they keep their own).
CHROMIUM: Final = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# -- results ---------------------------------------------------------------------------


@dataclass
class Check:
    """One figure against its target.

    Args:
        figure: what was measured ("median per call").
        value: the figure; None if it could not be measured.
        unit: its unit ("µs", "%", "points/s").
        limit: the target's bound, in ``unit``.
        better: "lower": the target is ``value <= limit``; "higher": ``value >= limit``.
        note: anything the reader needs to weigh the figure (noise, reduced scale).
        noise: how far the figure moves with no change at all (the spread of a
            baseline), in ``unit``; a figure nearer its limit than that is
            "unresolved" rather than a pass or a shortfall.
        floor: the figure is a lower bound of what the target is about, not the
            target's own measure: past the limit it shows a shortfall, within it it
            is only "consistent" with a pass.
    """

    figure: str
    value: float | None
    unit: str
    limit: float
    better: Literal["lower", "higher"] = "lower"
    note: str = ""
    noise: float | None = None
    floor: bool = False

    @property
    def target(self) -> str:
        return f"{'≤' if self.better == 'lower' else '≥'} {fmt(self.limit)} {self.unit}".strip()

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value <= self.limit if self.better == "lower" else self.value >= self.limit

    @property
    def resolved(self) -> bool:
        if self.noise is None or self.value is None or math.isnan(self.value):
            return True
        return abs(self.value - self.limit) > self.noise

    @property
    def verdict(self) -> str:
        if not self.resolved:
            return "unresolved"
        if not self.passed:
            return "falls short"
        return "consistent" if self.floor else "pass"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"target": self.target, "pass": self.passed, "verdict": self.verdict}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for people: 3 significant digits, thousands separated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("trainwire", "torch", "websockets", "uvicorn", "msgspec"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def report(
    name: str,
    checks: Sequence[Check],
    *,
    quick: bool,
    params: dict[str, Any],
    data: dict[str, Any] | None = None,
    load: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Print one line per check and write ``bench/results/<name>.json``.

    Args:
        load: :meth:`MachineLoad.stop` over the measurement, printed and kept.
    """
    width = max(len(c.figure) for c in checks)
    print()
    print(f"== {name} ({'quick' if quick else 'full'} mode) ==")
    for check in checks:
        value = f"{fmt(check.value)} {check.unit}".strip()
        print(f"  {check.figure:<{width}}  {value:>16}   target {check.target:<18} {check.verdict}")
        if check.note:
            print(f"  {'':<{width}}  ({check.note})")
    if load is not None:
        note = load_note(load)
        print(
            f"  machine load meanwhile: other processes {load['foreign_cores']:.2f} cores,"
            f" steal {load['steal_cores']:.2f}"
            + (f"  ** {note}: figures are pessimistic **" if note else "")
        )
    result = {
        "bench": name,
        "mode": "quick" if quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": params,
        "checks": [c.as_dict() for c in checks],
        "pass": all(c.verdict == "pass" for c in checks),
        "load": load,
        "data": data or {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"  results: {_relative(out)}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float, *, is_sorted: bool = False) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = values if is_sorted else sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart repetitions of one measurement land."""
    if len(values) < 2:
        return math.nan
    return (max(values) - min(values)) / median(values)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Count, min, percentiles and max of ``values``, for the JSON."""
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": ordered[0] if ordered else math.nan,
        "p50": percentile(ordered, 50, is_sorted=True),
        "p90": percentile(ordered, 90, is_sorted=True),
        "p99": percentile(ordered, 99, is_sorted=True),
        "p99.9": percentile(ordered, 99.9, is_sorted=True),
        "max": ordered[-1] if ordered else math.nan,
        "mean": sum(ordered) / len(ordered) if ordered else math.nan,
    }


def interleaved(
    variants: dict[str, Callable[[], float]], repetitions: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Run the variants A, B, A, B, ... ``repetitions`` times each (after ``warmup``
    rounds that are not kept), so that drift of the machine hits all alike.

    Returns:
        variant name -> the figures its calls returned, in order.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(warmup + repetitions):
        for name, run in variants.items():
            value = run()
            kept = round_number >= warmup
            print(
                f"  {'' if kept else 'warm-up '}{name} #{round_number - warmup + 1}: {fmt(value)}",
                flush=True,
            )
            if kept:
                results[name].append(value)
    return results


# -- processes -------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now, from /proc/PID/statm."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE_SIZE


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class MachineLoad:
    """How much CPU other processes took while a benchmark ran: the machine's busy
    time minus that of the benchmark's own processes (this one and ``pids``).

    A figure measured while other processes kept the cores busy is not the machine's:
    :meth:`stop` returns the foreign load in cores, and every report prints it.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.started = time.monotonic()
        self.busy, self.steal = machine_busy_seconds()
        self.own = self._own()
        self.loadavg = os.getloadavg()[0]

    def _own(self) -> float:
        children = os.times()  # subprocesses already ended (and waited for) are ours too
        total = cpu_seconds("self") + children.children_user + children.children_system
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        busy, steal = machine_busy_seconds()
        own = self._own() - self.own
        return {
            "seconds": wall,
            "own_cores": own / wall,
            "foreign_cores": max(0.0, (busy - self.busy - own) / wall),
            "steal_cores": (steal - self.steal) / wall,
            "loadavg_1min_at_start": self.loadavg,
        }


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait, at most ``max_wait`` seconds, until the machine is quiet: the CPU busy
    over 2 s (this process idle meanwhile) under ``threshold`` cores. Returns it."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, _ = machine_busy_seconds()
        time.sleep(2.0)
        busy = (machine_busy_seconds()[0] - busy0) / 2.0
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        print(f"  (machine busy: {busy:.2f} cores; waiting for it to calm down)", flush=True)


def load_note(load: dict[str, float]) -> str:
    """A warning when other processes took a noticeable share of the machine."""
    foreign = load["foreign_cores"]
    if foreign < 0.1:
        return ""
    return f"other processes used {foreign:.2f} of {os.cpu_count()} cores meanwhile"


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """CPU time of one thread of this process, from its own POSIX CPU clock
    (nanoseconds; /proc's figures count 10 ms ticks, too coarse for a few seconds)."""
    if thread.ident is None or not thread.is_alive():
        return math.nan
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:
        return math.nan


def pin(cpus: set[int] | None) -> None:
    """Pin this process (and the threads it starts later) to ``cpus``; None: every CPU."""
    os.sched_setaffinity(0, cpus or set(range(os.cpu_count() or 1)))


def raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    """A port nothing listens on (bound, then closed): connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def http_get(url: str, path: str, token: str = TOKEN, timeout: float = 5.0) -> Any:
    """GET a JSON document with the token; None if the server does not answer 200."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


@dataclass
class ServerProcess:
    """``python -m trainwire serve`` in its own process, default settings otherwise;
    stdout and stderr go to ``data_dir/server.out`` (``server-N.out`` for its Nth
    life after the first: it may be killed and started again).

    Args:
        data_dir: its data directory (made if missing), kept across lives.
        cpus: pin it to these CPUs (``os.sched_setaffinity`` before exec, as taskset).
        port: 0 for any free port; a fixed one keeps the server's URL across lives.
    """

    data_dir: Path
    cpus: set[int] | None = None
    port: int = 0
    token: str = TOKEN
    url: str = ""
    lives: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / ("server.out" if self.lives <= 1 else f"server-{self.lives}.out")

    def start(self) -> ServerProcess:
        """Start it; returns once it answers ``GET /api/health``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.lives += 1
        self.url = ""
        log_path = self.log_path
        cpus = self.cpus
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainwire", "serve", "--port", str(self.port)]
                + ["--data", str(self.data_dir), "--token", self.token],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + READY_TIMEOUT
        marker = "trainwire dashboard: "
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {log_path}")
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith(marker):
                    self.url = line.removeprefix(marker).split("/?", 1)[0]
            if self.url and http_get(self.url, "/api/health", self.token, 1.0) is not None:
                return self
            time.sleep(0.02)  # another process: nothing to wait on but its answer
        raise RuntimeError(f"server did not answer in {READY_TIMEOUT:g} s; see {log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ServerThread:
    """A trainwire server (uvicorn) in a thread of this process, on a port-0 socket
    bound before the thread starts (as ``tests/conftest.py``'s LiveServer)."""

    data_dir: Path
    token: str = TOKEN
    url: str = ""
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> ServerThread:
        import uvicorn

        from trainwire.server.app import create_app
        from trainwire.server.runner import bind, server_url, uvicorn_config
        from trainwire.settings import Settings

        settings = Settings(port=0, data_dir=self.data_dir, token=self.token)
        sock = bind("127.0.0.1", 0)
        self.url = server_url(sock)
        self._server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while http_get(self.url, "/api/health", self.token, 1.0) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("server thread did not answer")
            time.sleep(0.02)
        return self

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def client_environment(prefix: str) -> Iterator[Path]:
    """A temporary folder for the client's data (spill files) and the server's, with
    no ambient ``TRAINWIRE_*`` setting leaking in from the shell."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("TRAINWIRE_") or k == "RANK"}
    for key in saved:
        del os.environ[key]
    with tempfile.TemporaryDirectory(prefix=f"trainwire-bench-{prefix}-") as tmp:
        os.environ["TRAINWIRE_DATA"] = str(Path(tmp) / "client")
        os.environ["TRAINWIRE_TOKEN"] = TOKEN
        try:
            yield Path(tmp)
        finally:
            for key in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
                del os.environ[key]
            os.environ.update(saved)


def quiet_client_logs(path: Path | None = None) -> None:
    """The client's warnings (expected in some benchmarks) go to a file, or nowhere."""
    logger = logging.getLogger("trainwire")
    logger.propagate = False
    logger.handlers.clear()
    if path is not None:
        handler = logging.FileHandler(path, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())


def header(name: str, what: str, quick: bool) -> None:
    info = machine()
    print(
        f"{name}: {what} [{'quick' if quick else 'full'} mode; {info['cpu_model']},"
        f" {info['cpus']} CPUs; python {info['python']}]",
        flush=True,
    )


# -- profiles --------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH; None without one."""
    import shutil

    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy sampling another process (``--nonblocking``: it is not paused), written
    as collapsed stacks to ``bench/results/<name>-profile.txt``; :meth:`summary`
    gives the functions with the most samples, inclusive and on top of the stack."""

    def __init__(self, name: str, pid: int, seconds: float, *, gil_only: bool = False) -> None:
        self.path = RESULTS / f"{name}-profile.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        executable = py_spy()
        if executable is None:
            print("  (py-spy not found: no profile; pip install py-spy)")
            return
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = [executable, "record", "--nonblocking", "-f", "raw", "-r", "200"]
        command += ["-d", str(max(1, round(seconds))), "-p", str(pid), "-o", str(self.path)]
        command += ["--gil"] if gil_only else []
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def summary(self, top: int = 15) -> list[dict[str, Any]]:
        """Wait for py-spy to finish; the ``top`` functions by inclusive samples."""
        if self.proc is None:
            return []
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0 or not self.path.exists():
            print(f"  (py-spy failed: {err.decode(errors='replace').strip()[:200]})")
            return []
        inclusive: dict[str, int] = {}
        own: dict[str, int] = {}
        total = 0
        for line in self.path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            total += count
            frames = [_frame_name(f) for f in stack.split(";")]
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
            own[frames[-1]] = own.get(frames[-1], 0) + count
        rows = [
            {
                "function": frame,
                "inclusive": inclusive[frame] / total,
                "self": own.get(frame, 0) / total,
            }
            for frame in sorted(inclusive, key=lambda f: -inclusive[f])[:top]
        ]
        print(f"  profile ({total} samples, {_relative(self.path)}): inclusive / self")
        for row in rows:
            print(f"    {row['inclusive']:6.1%} {row['self']:6.1%}  {row['function']}")
        by_self = sorted(own, key=lambda f: -own[f])[:top]
        print("  most self time:")
        for frame in by_self:
            print(f"    {own[frame] / total:6.1%}  {frame}")
        return rows + [{"function": f, "self_only": True, "self": own[f] / total} for f in by_self]


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:123)"; drop the line number.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    return f"{name} ({file})" if file else name
