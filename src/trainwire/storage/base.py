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

    def open_run(self, spec: RunSpec, now: float) -> int:
        """Create the run, or reopen it; returns the last batch seq stored for it."""
        ...

    def append_batch(self, run_id: str, batch: Batch, now: float) -> Commit | None:
        """Store a batch; None when a batch with this seq (or later) is already stored."""
        ...

    def set_status(self, run_id: str, status: str, seq: int, now: float) -> RunInfo | None:
        """Change a run's status as its sequenced item ``seq``; None for a duplicate."""
        ...

    def list_runs(self) -> list[RunInfo]: ...

    def get_run(self, run_id: str) -> RunInfo | None: ...

    def keys(self, run_id: str) -> list[str]: ...

    def metrics(
        self, run_id: str, keys: list[str] | None = None, after: int = 0
    ) -> tuple[int, dict[str, Series]]:
        """Points of batches with seq > ``after``, per key, and the run's last seq
        read in the same transaction. Values are raw floats (NaN included)."""
        ...

    def close(self) -> None: ...
