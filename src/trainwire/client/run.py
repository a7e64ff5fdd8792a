"""``init`` / ``log`` / ``finish``: the API a training script calls.

``Run.log`` is the hot path: it stamps the row and appends it to a queue, and
nothing else. Converting values, batching and every byte of I/O happen on the
sender thread. Nothing here raises into the training loop after ``init``.
"""

from __future__ import annotations

import atexit
import enum
import logging
import math
import os
import platform
import secrets
import signal
import sys
import threading
import time
import urllib.error
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, get_args
from urllib.parse import quote, urlencode, urlsplit

from trainwire import __version__
from trainwire.client import environment
from trainwire.client.config import plain_config
from trainwire.client.local import ensure_local_server, local_token
from trainwire.client.notice import notice
from trainwire.client.resume import RESUME_TIMEOUT, last_step
from trainwire.client.sender import OPEN_TIMEOUT, LoggedRow, Sender, tls_context
from trainwire.client.spool import SpillingOutbox, left_undelivered, new_header
from trainwire.client.system import SystemSampler
from trainwire.client.tensors import read_cpu_scalars
from trainwire.exceptions import ConfigError
from trainwire.protocol.limits import run_id_problem
from trainwire.protocol.messages import FinishStatus, RunSpec
from trainwire.protocol.session import ClientSession
from trainwire.settings import default_data_dir, env_port, is_loopback

__all__ = ["Run", "RunState", "finish", "init", "log"]

_now: Final = time.time  # one global lookup in log(), not a global and an attribute

logger = logging.getLogger("trainwire.client")

DEFAULT_FINISH_TIMEOUT: Final = 30.0
DEFAULT_MEMORY_ROWS: Final = 100_000
DEFAULT_DISK_BYTES: Final = 1 << 30
# finish() waits this much past its timeout for the sender to end: long enough for a
# connection attempt under way at the deadline (OPEN_TIMEOUT) to give up, so that the
# sender is saving by then if it must. Then, while it writes what it held in memory
# to the run file, up to SAVE_WAIT more: that is local disk work, and a script that
# exits during it would lose those rows.
SENDER_GRACE: Final = OPEN_TIMEOUT + 1.0
SAVE_WAIT: Final = 60.0


class RunState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    # A copy of the run in a process forked after init() (a DataLoader worker): it
    # has no sender thread, and must neither write nor end the parent's run.
    DETACHED = "detached"


class Run:
    """One training run, streaming to a trainwire server (or to a file, offline).

    Made by :func:`trainwire.init`; use it as a context manager, or call
    :meth:`finish` at the end. ``log`` is safe to call from several threads.

    Attributes:
        id: the run's id, chosen here so that it is known before the server answers.
        url: the dashboard page of this run; None offline.
        path: the run's file: the spill file online, the whole run offline.
    """

    def __init__(
        self,
        spec: RunSpec,
        server_url: str | None,
        *,
        data_dir: Path,
        rank: int | None = None,
        flush_interval: float = 0.02,
        max_memory_rows: int = DEFAULT_MEMORY_ROWS,
        max_disk_bytes: int = DEFAULT_DISK_BYTES,
        enabled: bool = True,
        token: str | None = None,
        insecure: bool | None = None,
        system_metrics: bool = False,
        resume: bool = False,
        say_new_run: bool = True,
        last_step: int = -1,
    ) -> None:
        self.id = spec.id
        self.project = spec.project
        self.name = spec.name
        self.config = spec.config
        self.rank = rank
        self.server_url = server_url.rstrip("/") if server_url else None
        self.url: str | None = None
        if self.server_url:
            # The link carries the token, as Jupyter's does: the page moves it to a
            # cookie at once, out of the address bar and history.
            query = {"run": self.id, **({"token": token} if token else {})}
            self.url = f"{self.server_url}/?{urlencode(query, quote_via=quote)}"
        self._running = False
        self.state = RunState.RUNNING if enabled else RunState.DETACHED
        self._dropped_calls = 0
        self._max_queued = max(max_memory_rows, 10_000)
        self._warned_closed = False
        self._queue: deque[LoggedRow] = deque()
        self._lock = threading.Lock()
        # One stream per process and run: a resumed run or another rank numbers its
        # batches apart from every other writer of the same run.
        stream = secrets.token_hex(6)
        self.path = data_dir / "runs" / spec.id / f"{stream}.twrun"
        offline = server_url is None
        outbox = SpillingOutbox(
            self.path,
            new_header(spec, stream, rank),
            memory_rows=0 if offline else max_memory_rows,
            disk_bytes=max_disk_bytes,
            keep=offline,
        )
        session = ClientSession(
            spec,
            stream=stream,
            rank=rank,
            outbox=outbox,
            client=f"trainwire-python/{__version__}",
            resume=resume,
        )
        self._sender = Sender(
            session,
            self._queue,
            _ingest_url(self.server_url, insecure) if self.server_url else None,
            flush_interval=flush_interval,
            token=token,
            say_new_run=say_new_run,
        )
        self._sender.continue_after(last_step)
        self._system: SystemSampler | None = None
        if enabled and not offline:
            # A run id used before here (resume=, a torchrun restart, an id= of the
            # user's): rows an earlier process left undelivered wait in its files,
            # which nothing else would point to (a killed trainer said nothing).
            for left in left_undelivered(self.path.parent, rank):
                notice(
                    logger,
                    "trainwire: %s holds rows of run %s that an earlier process left "
                    "undelivered: `trainwire sync %s` uploads them (storing nothing "
                    "twice), after which the file can go",
                    left,
                    self.id,
                    left,
                )
        if enabled:
            self._sender.start()
            _live_runs.add(self)
            _finish_at_exit.install()
            if system_metrics:
                self._system = SystemSampler(self._log_system)
                self._system.start()

    @property
    def state(self) -> RunState:
        return self._state

    @state.setter
    def state(self, state: RunState) -> None:
        self._state = state
        self._running = state is RunState.RUNNING  # log()'s one check, a bool

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record metrics at a step. Returns at once and never raises.

        Args:
            metrics: metric key -> value: Python numbers, numpy scalars, or 0-d
                tensors on any device (a GPU's converted off the training thread,
                without a sync; a CPU tensor's read at once, which waits for nothing).
            step: the step; if omitted, one more than the last step logged.
        """
        # The training thread's path, run cold between two steps of a training loop
        # (its code and data evicted by the step): every lookup and call here costs
        # several times its warm cost, so the rare cases go to _refuse.
        try:
            queue = self._queue
            if not self._running or len(queue) >= self._max_queued:
                self._refuse()
                return
            # A copy: the caller may reuse and mutate its dict after log() returns.
            # No lock: deque.append is atomic, and a missing step is filled in by the
            # sender in queue order, which is the order of the log() calls.
            values = dict(metrics)
            row: LoggedRow = (step, _now(), values)
            for key, value in values.items():
                # Rows of floats under str keys: two checks a value, no call, and the
                # sender passes them on untouched.
                if type(value) is not float or type(key) is not str:
                    # CPU tensors: their numbers, read at once. A row with anything
                    # else the sender checks and converts (the False).
                    if not read_cpu_scalars(values):
                        row = (step, row[1], values, False)
                    break
            queue.append(row)
            if self._sender.idle:  # asleep with nothing to do: one wake per idle spell
                self._sender.wake()
        except Exception:  # the training loop's boundary: count, warn once, go on
            self._dropped_calls += 1
            if self._dropped_calls == 1:
                if isinstance(metrics, Mapping):  # a bug of ours, or a mapping's own
                    logger.warning("trainwire could not record a log() call", exc_info=True)
                else:  # the caller's mistake: said plainly, not with our traceback
                    logger.warning(
                        "trainwire: log() takes a dict of metrics, not %s; call dropped",
                        type(metrics).__name__,
                    )

    def _refuse(self) -> None:
        """log() when the run is not running, or its queue is full."""
        if self.state is not RunState.RUNNING:
            if self.state is RunState.FINISHED and not self._warned_closed:
                self._warned_closed = True
                logger.warning("run %s is finished: log() calls are ignored", self.id)
            return
        # The sender cannot keep up (a loop logging far faster than it can convert):
        # drop, count, and say so once, rather than grow without bound.
        self._dropped_calls += 1
        if self._dropped_calls == 1:
            logger.warning(
                "trainwire: log() is called faster than points can be handled; "
                "dropping (the count is reported at finish())"
            )

    def _log_system(self, second: int, values: dict[str, float]) -> None:
        # Their own queue: their steps (seconds) must not move the training's step count.
        if self.state is RunState.RUNNING:
            self._sender.system_queue.append((second, time.time(), values))
            if self._sender.idle:
                self._sender.wake()

    def finish(
        self, timeout: float | None = DEFAULT_FINISH_TIMEOUT, *, status: FinishStatus = "finished"
    ) -> None:
        """End the run: deliver what was logged, then mark the run ``status``.

        Idempotent, and never raises. Waits at most ``timeout`` seconds (None or
        ``math.inf``: as long as it takes) for the server to acknowledge; what is left
        undelivered is written to :attr:`path` (for ``trainwire sync``) before it
        returns. ``status`` is ``"finished"`` or ``"crashed"``; anything else ends the
        run ``"crashed"``, with a warning (the server would refuse it, and the run's
        end with it, at every resend).
        """
        timeout = _wait_seconds(timeout)
        if status not in get_args(FinishStatus):
            logger.warning(
                "trainwire: finish(status=%r) is not one of %s; the run ends crashed",
                status,
                ", ".join(get_args(FinishStatus)),
            )
            status = "crashed"
        try:
            if self._close(status, timeout):
                self._wait_for_sender(timeout)
        except KeyboardInterrupt:
            # Ctrl-C while finish() waits on a server away: the script is about to
            # exit, and the daemon sender with it, holding the rows in memory. The
            # run is no longer open, so the exit's finish would not save them either.
            if self.state is RunState.FINISHED and not self._sender.ended.is_set():
                logger.warning("trainwire: interrupted; saving what was not delivered")
                _save_now([self], status)
            raise

    def _close(self, status: FinishStatus, timeout: float) -> bool:
        """finish()'s first half: no more rows; the sender delivers what is left and
        the run's end within ``timeout``. False if the run was not running."""
        with self._lock:
            if self.state is not RunState.RUNNING:
                return False
            self.state = RunState.FINISHED
        _live_runs.discard(self)
        if self._system is not None:
            self._system.stop()
        try:
            self._sender.close(status, timeout)
        except Exception:  # finish() is called from the training script: never raise
            logger.warning("trainwire could not finish run %s cleanly", self.id, exc_info=True)
            return False
        return True

    def _wait_for_sender(self, timeout: float) -> None:
        """finish()'s second half: wait for the sender, told to close ``timeout``
        seconds ago at most, then say what was not delivered."""
        try:
            if threading.current_thread() is not self._sender:  # finish() from a value's .item()
                # Thread.join overflows past threading.TIMEOUT_MAX: None waits without end.
                self._sender.join(None if math.isinf(timeout) else timeout + SENDER_GRACE)
                if self._sender.is_alive() and self._sender.saving:
                    self._sender.join(SAVE_WAIT)
            self._report()
        except Exception:  # finish() is called from the training script: never raise
            logger.warning("trainwire could not finish run %s cleanly", self.id, exc_info=True)

    def _report(self) -> None:
        sender = self._sender
        if self.server_url is None:
            if self.path.exists():
                notice(
                    logger,
                    "trainwire: offline run %s written to %s; upload it with: trainwire sync %s",
                    self.id, self.path, self.path,
                )  # fmt: skip
            else:
                logger.warning(
                    "trainwire: offline run %s could not be written to %s", self.id, self.path
                )
        elif not sender.complete:
            left = sender.session.pending_rows + len(self._queue)
            kept = ""
            if self.path.exists():
                kept = f" (kept in {self.path}: trainwire sync uploads them)"
            why = "within the timeout"
            if sender.refused is not None:  # its token: no use waiting, nor saying "timeout"
                why = f"(refused: {sender.refused})"
            logger.warning(
                "trainwire: run %s not confirmed by %s %s; %d rows undelivered%s",
                self.id, self.server_url, why, left, kept,
            )  # fmt: skip
        dropped = sender.dropped_rows + self._dropped_calls
        if dropped:  # each cause was said once as it happened
            logger.warning(
                "trainwire: %d rows of run %s were dropped (the warnings above say why)",
                dropped,
                self.id,
            )
        refused = sender.session.refused_values
        if refused:
            logger.warning(
                "trainwire: %d values of run %s were not stored: it has the most metric "
                "keys the server allows",
                refused, self.id,
            )  # fmt: skip

    @property
    def delivered(self) -> bool:
        """True once the server has stored everything, including the run's end."""
        return self.server_url is not None and self._sender.complete

    def _detach(self) -> None:
        self.state = RunState.DETACHED
        self._lock = threading.Lock()  # the parent's may have been held at fork time

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled into another process: a DataLoader worker under spawn or forkserver
        # (the start methods of macOS and Windows, and of Linux from Python 3.14)
        # handed a dataset that holds the run. Its copy is detached, as a forked
        # child's is; the sender's thread and lock made pickling raise instead.
        spec = self._sender.session.run
        return (_detached_copy, (spec, self.server_url, self.url, self.path, self.rank))

    def __copy__(self) -> Run:
        # A handle on the run, as a logging.Logger is on its log: a copied trainer,
        # or model wrapper, logs into the same run (a detached copy would drop it all).
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Run:
        return self

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(status="finished" if exc is None else "crashed")

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.project}/{self.name} {self.state.value}>"


def _detached_copy(
    spec: RunSpec, server_url: str | None, url: str | None, path: Path, rank: int | None
) -> Run:
    """A run unpickled: its ``log()`` and ``finish()`` do nothing (see Run.__reduce__)."""
    run = Run(spec, None, data_dir=path.parents[2], rank=rank, enabled=False)
    run.server_url, run.url, run.path = server_url, url, path
    return run


_live_runs: set[Run] = set()  # running, until finish(): strong, see _FinishAtExit


class _FinishAtExit:
    """Finishes, when the interpreter exits, every run the script left open: most
    scripts never call finish(). The sender is a daemon thread (a server away must
    not hold the script's exit), so without this the rows of its last flush
    interval, the run's end, and while the server was away every row held, died
    with it, the run left "running" until the server's reaper called it crashed.

    The run ends "crashed" if the script ended by an uncaught exception (seen by a
    ``sys.excepthook`` that hands it on to the one it replaced), else "finished";
    ``sys.exit(N)`` raises no exception it can see, whatever N. Installed by the
    first run, not at import: importing trainwire changes nothing of the process.
    """

    def __init__(self) -> None:
        self.installed = False
        self.uncaught = False
        self._finalizer_pid: int | None = None

    def install(self) -> None:
        self._install_in_multiprocessing()
        if self.installed:
            return
        self.installed = True
        previous = sys.excepthook

        def excepthook(
            kind: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            # The interactive interpreter calls the hook for each error typed: none
            # of them ends the session. (sys.ps1 exists only there.)
            if not hasattr(sys, "ps1"):
                self.uncaught = True
            previous(kind, exc, tb)

        sys.excepthook = excepthook
        atexit.register(self.finish_open_runs)

    def _install_in_multiprocessing(self) -> None:
        # A multiprocessing child started by fork or forkserver (a sweep's worker;
        # Linux's default methods) ends with os._exit, which runs no atexit hook: its
        # open runs lost their last rows and their end. It runs multiprocessing's own
        # finalizers first, from a registry each child starts empty: one per process.
        util = sys.modules.get("multiprocessing.util")
        if util is not None and self._finalizer_pid != os.getpid():
            self._finalizer_pid = os.getpid()
            util.Finalize(None, self._finish_in_child, exitpriority=0)

    def _finish_in_child(self) -> None:
        # multiprocessing runs its finalizers in a `finally` around the target, so an
        # exception on its way out, which it prints and never hands to excepthook,
        # is still sys.exc_info() here: the run ended by it is crashed.
        exc = sys.exc_info()[1]
        if exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.uncaught = True
        self.finish_open_runs()

    def finish_open_runs(self, timeout: float = DEFAULT_FINISH_TIMEOUT) -> None:
        """Every open run at once: their senders deliver side by side, within one
        ``timeout`` (one after the other, a sweep's runs with the server away held
        the exit 30 s each). Said when it takes a while, and Ctrl-C stops the wait:
        what is not delivered is then saved to the runs' files."""
        status: FinishStatus = "crashed" if self.uncaught else "finished"
        closing = [run for run in list(_live_runs) if run._close(status, timeout)]
        if not closing:
            return
        started = time.monotonic()
        waiting = list(closing)
        terminated = _TerminateAsInterrupt()
        try:
            terminated.install()
            late = _still_sending(closing, started + NOTICE_AFTER)
            if late:
                logger.warning(
                    "trainwire: delivering the last rows of %d run(s) left open at exit; "
                    "waiting up to %g s for %s (Ctrl-C saves them to the run files instead)",
                    len(late),
                    timeout,
                    ", ".join(sorted({str(run.server_url or run.path) for run in late})),
                )
            while waiting:
                waiting[0]._wait_for_sender(max(0.0, timeout - (time.monotonic() - started)))
                waiting.pop(0)
        except KeyboardInterrupt:
            logger.warning("trainwire: interrupted; saving what was not delivered")
            _save_now(waiting, status)
        finally:
            terminated.uninstall()


class _TerminateAsInterrupt:
    """SIGTERM, while the exit waits on a server, taken as Ctrl-C: what is not
    delivered is saved to the run files, then the signal does what it would have.

    Whoever stops a process politely gives it a few seconds, not the exit's 30:
    Jupyter's kernel restart or shutdown sends SIGTERM 2.5 s after asking the kernel
    to exit, docker stop after 10. Python's default answer ends the process at once,
    and every row the sender held in memory died with it, no run file written."""

    def __init__(self) -> None:
        self._installed = False
        self._previous: Any = signal.SIG_DFL
        self.received = False

    def install(self) -> None:
        # Only the main thread may set a handler (the exit's own thread; a
        # multiprocessing child's finalizers too, unless started elsewhere).
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # the script's choice
            return
        try:
            previous = signal.signal(signal.SIGTERM, self._handle)
        except (ValueError, OSError):
            return
        # None: a handler set outside Python, which cannot be put back; the default.
        self._previous = signal.SIG_DFL if previous is None else previous
        self._installed = True

    def _handle(self, signum: int, frame: object) -> None:
        if not self.received:  # a second one must not cut the saving short
            self.received = True
            raise KeyboardInterrupt

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        signal.signal(signal.SIGTERM, self._previous)
        if self.received:  # the rows are saved: now what SIGTERM was to do
            signal.raise_signal(signal.SIGTERM)


def _save_now(runs: list[Run], status: FinishStatus) -> None:
    """Out of time (Ctrl-C): each sender saves what is not delivered to its run's
    file, side by side; returns once they have, then says what was not delivered."""
    for run in runs:
        run._sender.close(status, 0.0)
    for run in runs:
        # Not join(): the interrupted one took its sender for ended.
        ended = run._sender.ended
        if not ended.wait(SENDER_GRACE) and run._sender.saving:
            ended.wait(SAVE_WAIT)
        run._report()


NOTICE_AFTER: Final = 1.0  # an exit's finish that takes longer than this is said


def _still_sending(runs: list[Run], deadline: float) -> list[Run]:
    """The runs whose sender has not ended by ``deadline`` (a time.monotonic)."""
    for run in runs:
        run._sender.join(max(0.0, deadline - time.monotonic()))
    return [run for run in runs if run._sender.is_alive()]


_finish_at_exit: Final = _FinishAtExit()


def _after_fork_in_child() -> None:
    for run in list(_live_runs):
        run._detach()
    _live_runs.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _ingest_url(server_url: str, insecure: bool | None = None) -> str:
    """The trainer endpoint of a server URL.

    Raises:
        ConfigError: not http(s), or plain http to another machine without
            ``insecure`` (the token and every metric would cross the network in
            clear text).
    """
    if insecure is None:
        insecure = os.environ.get("TRAINWIRE_INSECURE", "") not in ("", "0")
    parts = urlsplit(server_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"TRAINWIRE_URL must start with http:// or https://, not {server_url!r}")
    if scheme == "ws" and not insecure and not is_loopback(parts.hostname or ""):
        raise ConfigError(
            f"refusing plain {parts.scheme}:// to {parts.hostname}: use https://, or pass "
            "insecure=True (TRAINWIRE_INSECURE=1) if the network is trusted"
        )
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/ingest"


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _env_rank() -> int | None:
    # torchrun, torch.distributed.launch and most launchers set RANK.
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


def _elastic_restart() -> bool:
    # torchrun's elastic agent counts the restarts of a job's workers.
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return count.isdigit() and int(count) > 0


def _shared_run_id() -> str | None:
    # What every rank of one job sees alike, when the user gave no id.
    for variable in ("TRAINWIRE_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(variable)
        if value and value != "none":
            return value
    return None


_current: Run | None = None


def init(
    project: str = "default",
    name: str | None = None,
    config: Mapping[str, Any] | object = None,
    *,
    id: str | None = None,  # noqa: A002 - the name users know from wandb
    resume: str | None = None,
    mode: Literal["online", "offline"] | None = None,
    ranks: Literal["zero", "all"] = "zero",
    rank: int | None = None,
    url: str | None = None,
    token: str | None = None,
    insecure: bool | None = None,
    system_metrics: bool | None = None,
    flush_interval: float = 0.02,
    max_memory_rows: int = DEFAULT_MEMORY_ROWS,
    max_disk_bytes: int = DEFAULT_DISK_BYTES,
) -> Run:
    """Start a run and its background sender.

    Args:
        project: groups runs in the dashboard.
        name: the run's display name; a generated one if omitted.
        config: hyper-parameters, shown with the run: a mapping, a dataclass, a
            pydantic model or an ``argparse.Namespace``; numpy and torch scalars in it
            are kept as numbers, anything else JSON cannot spell as its ``str()``.
        id: the run's id; a new one if omitted (``TRAINWIRE_RUN_ID`` also sets it).
        resume: the id of a run to continue, after a restart of the training script.
            A job torchrun restarts (``TORCHELASTIC_RESTART_COUNT`` above 0) continues
            its run so without it, when the run's id is the job's.
        mode: ``"online"`` streams to a server; ``"offline"`` writes only the run's
            file, for ``trainwire sync`` later. Default: ``TRAINWIRE_MODE``, else online.
        ranks: in a distributed job, ``"zero"`` logs from rank 0 alone (other ranks
            get a run whose ``log`` does nothing); ``"all"`` logs every rank into one
            run, its keys under ``rank{N}/``, with the id shared through ``id``,
            ``TRAINWIRE_RUN_ID``, ``TORCHELASTIC_RUN_ID`` or ``SLURM_JOB_ID``.
        rank: this process's rank; default ``RANK`` from the environment.
        url: the server, ``http(s)://host:port``; else ``TRAINWIRE_URL``; else the
            user's local server, started in the background if none answers.
        token: the server's token; else ``TRAINWIRE_TOKEN``; for the local server,
            the one in its data directory.
        insecure: allow plain http/ws to a host other than this machine (else
            ``TRAINWIRE_INSECURE=1``). Certificates of https servers are always
            verified, against ``TRAINWIRE_CA`` when set.
        system_metrics: sample CPU, RAM and NVIDIA GPUs once a second into the run
            (keys ``system/...``); default on, off with ``TRAINWIRE_SYSTEM_METRICS=0``.
            The run's environment (host, OS, Python, command line, pid, torch and
            CUDA versions, GPU names) is recorded with the run either way.
        flush_interval: the longest a logged point waits before it is sent while the
            loop logs up to 125 rows a second; a faster loop stretches the wait in
            proportion, up to 0.25 s (fewer wake-ups of the sender, which compete
            with the loop for the GIL; a larger value here is never shortened).
        max_memory_rows: rows held in memory while the server is unreachable,
            before spilling to the run's file.
        max_disk_bytes: the run file's bound; past it new points are dropped and counted.

    Returns:
        the run; also the target of :func:`trainwire.log` and :func:`trainwire.finish`.

    Raises:
        ConfigError: a bad ``url``, ``mode``, ``ranks`` or run id (``id``, ``resume``
            or from the environment: a path separator, control characters, or over
            255 bytes), or ``ranks="all"`` without a shared run id.
        TransientError: no local server could be started (only when no url is given).
    """
    global _current
    # Set but empty (`TRAINWIRE_MODE=$MODE`, MODE unset) is unset, as for every
    # TRAINWIRE_* variable: it raised ConfigError.
    mode = mode or os.environ.get("TRAINWIRE_MODE") or "online"  # type: ignore[assignment]
    if mode not in ("online", "offline"):
        raise ConfigError(f"mode must be 'online' or 'offline', not {mode!r}")
    if ranks not in ("zero", "all"):
        raise ConfigError(f"ranks must be 'zero' or 'all', not {ranks!r}")
    rank = _env_rank() if rank is None else rank
    run_id = resume or id or os.environ.get("TRAINWIRE_RUN_ID")
    if ranks == "all" and rank is not None:
        run_id = run_id or _shared_run_id()
        if run_id is None:
            raise ConfigError(
                "ranks='all' needs one run id for every rank: pass id=..., or set "
                "TRAINWIRE_RUN_ID in the job's environment"
            )
    # torchrun's restart of a failed job (--max-restarts) runs the script again under
    # the same id: the new attempt continues the run as resume= does, or the writers of
    # the attempt it replaces (killed, or ended by SIGTERM) left the run crashed for
    # good, and its log() calls without step= counted from 0 over the old points.
    restarted = resume is None and run_id is not None and _elastic_restart()
    run_id = run_id or _new_run_id()
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ConfigError(problem)
    spec = RunSpec(
        id=run_id,
        project=project,
        name=name or f"{platform.node()}-{run_id}",
        config=plain_config(config),
        env=environment.collect(),
    )
    data_dir = default_data_dir()
    if system_metrics is None:
        # Only 0 turns them off: set but empty is unset (it turned them off).
        system_metrics = os.environ.get("TRAINWIRE_SYSTEM_METRICS", "") != "0"
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "system_metrics": system_metrics,
        "flush_interval": flush_interval,
        "max_memory_rows": max_memory_rows,
        "max_disk_bytes": max_disk_bytes,
    }
    if ranks == "zero" and rank not in (None, 0):
        run = Run(spec, None, enabled=False, rank=rank, **options)
    elif mode == "offline":
        run = Run(spec, None, rank=rank if ranks == "all" else None, **options)
    else:
        server, token = resolve_server(url, token, data_dir)
        run_rank = rank if ranks == "all" else None
        ingest = _ingest_url(server, insecure)  # refuses plain ws to another host first
        resuming = resume is not None or restarted
        last = _resumed_step(server, ingest, token, spec.id, run_rank) if resuming else -1
        run = Run(
            spec,
            server,
            rank=run_rank,
            token=token,
            insecure=insecure,
            resume=resuming,
            # A restart's first attempt may have failed before it logged anything.
            say_new_run=resume is not None,
            last_step=last,
            **options,
        )
    _finish_previous()
    _current = run
    return run


# How long a new init() in a notebook waits for the previous run's last rows: past
# it they go to the run's file, as at finish().
PREVIOUS_FINISH_TIMEOUT: Final = 10.0


def _finish_previous() -> None:
    """In an interactive session (a notebook, the REPL: ``sys.ps1``), a new
    ``init()`` finishes the run of the previous one if it is still open, as wandb
    does in notebooks. Re-running a notebook's init cell left the first run
    "running" until the kernel exited, with nothing left to finish it by. A script
    may hold several runs at once, and keeps them."""
    previous = _current
    if previous is None or previous.state is not RunState.RUNNING or not hasattr(sys, "ps1"):
        return
    notice(logger, "trainwire: finishing run %s, left open by the previous init()", previous.id)
    previous.finish(timeout=PREVIOUS_FINISH_TIMEOUT)


def _resumed_step(
    server: str, ingest: str, token: str | None, run_id: str, rank: int | None
) -> int:
    """The step a resumed run's ``log()`` calls without ``step=`` count on from: its
    last on the server, or -1 (from 0) if it has none or cannot be asked.

    Asked on a thread of its own, waited for RESUME_TIMEOUT in all: urllib's timeout
    bounds each socket call, not the request, and the name lookup has none (a
    resolver that drops packets held init() its 10-30 s). One that answers later
    is left to its daemon thread."""
    outcome: list[int | None | Exception] = []

    def ask() -> None:
        try:
            context = tls_context() if ingest.startswith("wss:") else None
            outcome.append(last_step(server, token, run_id, rank=rank, ssl_context=context))
        except Exception as exc:  # noqa: BLE001 - said by the caller's thread
            outcome.append(exc)

    asker = threading.Thread(target=ask, name="trainwire-resume", daemon=True)
    asker.start()
    asker.join(RESUME_TIMEOUT)
    if not outcome:
        logger.warning(
            "trainwire could not read run %s's last step from %s (no answer within %g s): "
            "log() calls without step= count from 0",
            run_id,
            server,
            RESUME_TIMEOUT,
        )
        return -1
    try:
        last = outcome[0]
        if isinstance(last, Exception):
            raise last
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code != 404:  # 404: a run new to the server, which its welcome says
            logger.warning(
                "trainwire could not read run %s's last step (%s %s): log() calls "
                "without step= count from 0",
                run_id,
                exc.code,
                exc.reason,
            )
        return -1
    # OSError, a body that is not the run's summary (ValueError, KeyError, ...), and
    # http.client's HTTPException (a reply that is no HTTP, or cut short), which is no
    # OSError: whatever it is, init() raises only what its docstring says.
    except Exception as exc:  # noqa: BLE001
        logger.warning(
            "trainwire could not read run %s's last step from %s (%s): log() calls "
            "without step= count from 0",
            run_id,
            server,
            exc,
        )
        return -1
    return -1 if last is None else last


def resolve_server(url: str | None, token: str | None, data_dir: Path) -> tuple[str, str | None]:
    """The server to talk to, and the token to show it.

    The local server's token (in its data directory) is only ever sent to the local
    server: a token meant for one server must never travel to another.
    """
    token = token or os.environ.get("TRAINWIRE_TOKEN") or None
    server = url or os.environ.get("TRAINWIRE_URL")
    if server:
        return server, token
    server = ensure_local_server(data_dir, port=env_port(os.environ))
    return server, token or local_token(data_dir)


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """:meth:`Run.log` on the run of the last :func:`init`."""
    if _current is None:
        raise ConfigError("call trainwire.init() before trainwire.log()")
    _current.log(metrics, step)


def _wait_seconds(timeout: object) -> float:
    """finish()'s timeout as seconds: None waits without end; a negative number or NaN
    (which fails every comparison) not at all; anything else not a number, the default."""
    if timeout is None:
        return math.inf
    try:
        seconds = float(timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_FINISH_TIMEOUT
    return seconds if seconds >= 0 else 0.0


def finish(
    timeout: float | None = DEFAULT_FINISH_TIMEOUT, *, status: FinishStatus = "finished"
) -> None:
    """:meth:`Run.finish` on the run of the last :func:`init`; does nothing without one."""
    if _current is not None:
        _current.finish(timeout, status=status)
