"""The storage interface the server is written against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from trainwire.protocol.messages import Batch, RunInfo, RunSpec, Series

__all__ = ["Commit", "Store"]


@dataclass(frozen=True)
class Commit:
    """What one committed batch changed: the run's sequence number went from
    ``prev_seq`` to ``seq``."""

    prev_seq: int
    seq: int


class Store(Protocol):
    """Durable runs and points. Methods block: the server calls them in a thread pool.

    Every write is atomic, and a batch carries its sequence number into the same
    transaction, so a batch sent twice is stored once.
    """

    def open_run(self, spec: RunSpec, stream: str, now: float) -> int:
        """Create the run and the writer's stream, or reopen them (the run is then
        running again); returns the last batch seq stored for that stream."""
        ...

    def append_batch(
        self, run_id: str, stream: str, batch: Batch, now: float, prefix: str = ""
    ) -> Commit | None:
        """Store a batch, its keys under ``prefix``; None when the stream already
        holds this seq. ``Commit`` carries the run's commit counter, which orders
        every batch of the run, whatever its stream, for the dashboards."""
        ...

    def set_status(
        self, run_id: str, stream: str, status: str, seq: int, now: float
    ) -> RunInfo | None:
        """End a stream as its sequenced item ``seq``; None for a duplicate. The run
        is finished once every stream is."""
        ...

    def mark_crashed(self, run_id: str, now: float) -> RunInfo | None:
        """Every stream of the run still running has vanished: the run crashed."""
        ...

    def delete_run(self, run_id: str) -> bool:
        """Delete a run and all its points; False if there was none."""
        ...

    def running_runs(self) -> list[str]:
        """Ids of the runs whose status is ``running``."""
        ...

    def list_runs(self) -> list[RunInfo]: ...

    def get_run(self, run_id: str) -> RunInfo | None: ...

    def keys(self, run_id: str) -> list[str]: ...

    def metrics(
        self, run_id: str, keys: list[str] | None = None, after: int = 0
    ) -> tuple[int, dict[str, Series]]:
        """Points committed after the run's commit counter was ``after``, per key, and
        the counter read in the same transaction. Values are raw floats (NaN included)."""
        ...

    def close(self) -> None: ...
