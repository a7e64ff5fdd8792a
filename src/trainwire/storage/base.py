"""The storage interface the server is written against."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunInfo, RunSpec, Series

__all__ = ["Commit", "CommittedColumns", "RunDeleted", "SampledSeries", "SeriesSummary", "Store"]


class RunDeleted(StorageError):
    """A writer's stream is not in the store: its run was deleted (``DELETE
    /api/runs/{id}``) after it was opened. No failure of the store: ingest tells its
    writer so."""


@dataclass(frozen=True)
class Commit:
    """What one committed batch changed: the run's sequence number went from
    ``prev_seq`` to ``seq``. ``refused``: the batch's metric keys (as its writer
    named them) whose values were not stored, the run holding its most keys."""

    prev_seq: int
    seq: int
    refused: tuple[str, ...] = ()


class CommittedColumns(NamedTuple):
    """One metric's points as numpy columns, in commit order (logging order within a
    commit), with the commit of each: a reader can cut them at commit boundaries."""

    steps: npt.NDArray[np.int64]
    times: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    commits: npt.NDArray[np.int64]


class SampledSeries(Series):
    """One metric's points over a step range, sorted by step. ``sampled``: True when
    they were downsampled (see :mod:`trainwire.storage.downsample`), False when they
    are every point stored in the range."""

    sampled: bool = False


@dataclass(frozen=True)
class SeriesSummary:
    """One metric at a glance: how many points, the last one logged, and the extremes
    of its finite values (None when it has none)."""

    count: int
    last: float
    last_step: int
    min: float | None
    max: float | None


class Store(Protocol):
    """Durable runs and points. Methods block: the server calls them in a thread pool.

    Every write is atomic, and a batch carries its sequence number into the same
    transaction, so a batch sent twice is stored once.
    """

    def open_run(
        self,
        spec: RunSpec,
        stream: str,
        now: float,
        *,
        rank: int | None = None,
        replay: bool = False,
    ) -> int:
        """Create the run and the writer's stream, or reopen them (the run is then
        running again); returns the last batch seq stored for that stream.

        ``rank``: the writer's rank (None: the run has no ranks). ``replay``: the
        stream is a run file's, uploaded after its writer ended. New to a run where
        another stream has its rank (a later attempt took its place), it is set aside
        (it counts for nothing in the run's status, its end included); known, it is
        not reopened."""
        ...

    def append_batch(
        self,
        run_id: str,
        stream: str,
        batch: Batch,
        now: float,
        prefix: str = "",
        max_keys: int | None = None,
    ) -> Commit | None:
        """Store a batch, its keys under ``prefix``; None when the stream already
        holds this seq. ``Commit`` carries the run's commit counter, which orders
        every batch of the run, whatever its stream, for the dashboards. A key that
        would give the run more than ``max_keys`` keys has its values left out, the
        rest of the batch stored, and is named in ``Commit.refused``.

        Raises:
            RunDeleted: the run was deleted since the stream was opened.
        """
        ...

    def set_status(
        self, run_id: str, stream: str, status: str, seq: int, now: float
    ) -> RunInfo | None:
        """End a stream as its sequenced item ``seq``; None for a duplicate. The run
        is finished once every stream is.

        Raises:
            RunDeleted: the run was deleted since the stream was opened.
        """
        ...

    def set_aside(self, run_id: str, keep: Collection[str], now: float) -> RunInfo | None:
        """A writer resumed the run: every stream of it not in ``keep`` (those with
        a writer connected) that is not ended (its process gone) or ended crashed
        (the attempt the resume replaces) is set aside; it no longer holds the run
        running nor makes it crashed."""
        ...

    def mark_crashed(self, run_id: str, now: float) -> RunInfo | None:
        """Every stream of the run still running has vanished: the run crashed."""
        ...

    def revive(self, run_id: str, now: float) -> RunInfo | None:
        """Undo :meth:`mark_crashed`: every crashed stream of the run runs again (a
        finished one stays finished), and so does the run."""
        ...

    def delete_run(self, run_id: str) -> bool:
        """Delete a run and all its points; False if there was none:
        :meth:`detach_run`, then :meth:`purge_deleted`."""
        ...

    def detach_run(self, run_id: str) -> bool:
        """Take a run away at once: gone for every reader, and a writer that goes on
        opens it anew; False if there was none. Its points are left for
        :meth:`purge_deleted`, which may take seconds for a big run."""
        ...

    def purge_deleted(self) -> None:
        """Delete the points of the runs taken away by :meth:`detach_run`, a slice at
        a time, other requests served between slices."""
        ...

    def running_runs(self) -> list[str]:
        """Ids of the runs whose status is ``running``."""
        ...

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        ...

    def runs_json(self) -> bytes:
        """:meth:`list_runs` as a JSON array of RunInfo, as the API and dashboards
        send it. A store that keeps config and env as JSON passes them through: 5,000
        runs of 5 KB each were decoded and encoded again in 2 s, now 0.3 s."""
        ...

    def get_run(self, run_id: str) -> RunInfo | None: ...

    def keys(self, run_id: str) -> list[str]: ...

    def metrics(
        self, run_id: str, keys: list[str] | None = None, after: int = 0
    ) -> tuple[int, dict[str, Series]]:
        """Points committed after the run's commit counter was ``after``, per key, and
        the counter read in the same transaction. Values are raw floats (NaN included)."""
        ...

    def columns_after(self, run_id: str, after: int) -> tuple[int, dict[str, CommittedColumns]]:
        """:meth:`metrics` of every key, as numpy columns with each point's commit:
        for a reader that sends them in parts (a dashboard's catch-up), converting
        only a part at a time."""
        ...

    def history(
        self,
        run_id: str,
        keys: list[str] | None = None,
        start: int | None = None,
        end: int | None = None,
        points: int | None = None,
    ) -> tuple[int, dict[str, SampledSeries]]:
        """The points of steps ``start`` to ``end`` (inclusive; open-ended where None).

        Returns:
            the run's commit counter, read in the same transaction (a dashboard that
            subscribes after it misses nothing and gets nothing twice; 0 for no such
            run), and per key of the run (those of ``keys``, if given; unknown ones
            are left out, and a key with no point in the range has empty columns)
            its points sorted by step, points of one step in logging order, and
            downsampled to at most ``points`` when given (see
            :func:`trainwire.storage.downsample.downsample`).
        """
        ...

    def summary(self, run_id: str) -> dict[str, SeriesSummary]:
        """Per key of the run that has points: count, last value, extremes."""
        ...

    def close(self) -> None: ...
