"""The chunk: how a run of one series' points is packed into one storage row.

Pure: numpy in, bytes out, and back; no I/O. A chunk holds the points of one metric
key from one or more consecutive commits, in logging order, as little-endian columns
(``steps`` int64, ``times`` and ``vals`` float64, NaN stored as itself), with the
figures a query filters on beside them: the commits it spans (``seq_lo``..``seq_hi``),
its step range, and the min and max of its finite values.

One row per point made ``executemany`` most of the server's ingest time; one row per
chunk moves each point's bytes with a single copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "Chunk",
    "Columns",
    "commits_after",
    "decode",
    "decode_after",
    "decode_through",
    "encode",
    "merge",
    "pack_commits",
]

Int64s = npt.NDArray[np.int64]
Float64s = npt.NDArray[np.float64]

_I8: np.dtype[np.int64] = np.dtype("<i8")
_F8: np.dtype[np.float64] = np.dtype("<f8")


class Columns(NamedTuple):
    """Points of one series, in columns."""

    steps: Int64s
    times: Float64s
    values: Float64s


class Chunk(NamedTuple):
    """One row of the ``chunks`` table, less its ``series_id``, in column order.

    ``seqs`` is None when every point came from one commit (``seq_lo == seq_hi``).
    Otherwise it holds ``2k`` int64: the ``k`` commits the chunk spans, ascending,
    then where each commit's points end (the points of commit ``i`` are those from
    the end of commit ``i - 1`` up to its own). Two numbers per commit rather than one
    per point: a merged chunk of 1000-row batches stays the size of its data.
    """

    seq_lo: int
    seq_hi: int
    n: int
    step_lo: int
    step_hi: int
    vmin: float | None
    vmax: float | None
    steps: bytes
    times: bytes
    vals: bytes
    seqs: bytes | None


def encode(
    seq: int, steps: Sequence[int], times: Sequence[float], values: Sequence[float]
) -> Chunk:
    """The chunk of one commit's points of one series (at least one point)."""
    step_array = np.array(steps, dtype=_I8)
    value_array = np.array(values, dtype=_F8)
    vmin, vmax = _finite_range(value_array)
    return Chunk(
        seq,
        seq,
        len(step_array),
        int(step_array.min()),
        int(step_array.max()),
        vmin,
        vmax,
        step_array.tobytes(),
        np.array(times, dtype=_F8).tobytes(),
        value_array.tobytes(),
        None,
    )


def merge(chunks: Sequence[Chunk]) -> Chunk:
    """One chunk holding every point of ``chunks``, which must be consecutive (in
    commit order) chunks of one series."""
    columns = [decode(chunk) for chunk in chunks]
    commits = np.concatenate([_commits(chunk) for chunk in chunks])
    counts = np.concatenate([_counts(chunk) for chunk in chunks])
    return _pack(
        Columns(
            np.concatenate([c.steps for c in columns]),
            np.concatenate([c.times for c in columns]),
            np.concatenate([c.values for c in columns]),
        ),
        commits,
        counts,
    )


def pack_commits(columns: Columns, seqs: Int64s) -> Chunk:
    """One chunk of points in commit order; ``seqs`` is each point's commit."""
    starts = np.concatenate(([0], np.flatnonzero(np.diff(seqs)) + 1))
    counts = np.diff(np.append(starts, len(seqs)))
    return _pack(columns, seqs[starts], counts)


def decode(chunk: Chunk) -> Columns:
    """Every point of a chunk, in logging order. The arrays are read-only views."""
    return Columns(
        np.frombuffer(chunk.steps, dtype=_I8),
        np.frombuffer(chunk.times, dtype=_F8),
        np.frombuffer(chunk.vals, dtype=_F8),
    )


def decode_after(chunk: Chunk, after: int) -> Columns:
    """The points of a chunk committed after commit ``after``, in logging order."""
    columns = decode(chunk)
    if chunk.seq_lo > after:
        return columns
    if chunk.seq_hi <= after:
        return Columns(columns.steps[:0], columns.times[:0], columns.values[:0])
    assert chunk.seqs is not None  # seq_lo <= after < seq_hi: several commits
    commits, ends = _commit_table(chunk.seqs)
    kept = int(np.searchsorted(commits, after, side="right"))
    first = int(ends[kept - 1]) if kept else 0
    return Columns(columns.steps[first:], columns.times[first:], columns.values[first:])


def decode_through(chunk: Chunk, last: int) -> Columns:
    """The points of a chunk committed up to commit ``last``, in logging order."""
    columns = decode(chunk)
    if chunk.seq_hi <= last:
        return columns
    if chunk.seq_lo > last:
        return Columns(columns.steps[:0], columns.times[:0], columns.values[:0])
    assert chunk.seqs is not None  # seq_lo <= last < seq_hi: several commits
    commits, ends = _commit_table(chunk.seqs)
    kept = int(np.searchsorted(commits, last, side="right"))
    stop = int(ends[kept - 1])  # kept >= 1: commits[0] == seq_lo <= last
    return Columns(columns.steps[:stop], columns.times[:stop], columns.values[:stop])


def commits_after(chunk: Chunk, after: int) -> Int64s:
    """The commit of each point :func:`decode_after` returns, in the same order."""
    commits, counts = _commits(chunk), _counts(chunk)
    kept = commits > after
    return np.repeat(commits[kept], counts[kept])


def _pack(columns: Columns, commits: Int64s, counts: Int64s) -> Chunk:
    steps, times, values = columns
    vmin, vmax = _finite_range(values)
    seqs = None
    if len(commits) > 1:
        seqs = np.concatenate((commits, np.cumsum(counts))).astype(_I8).tobytes()
    return Chunk(
        int(commits[0]),
        int(commits[-1]),
        len(steps),
        int(steps.min()),
        int(steps.max()),
        vmin,
        vmax,
        steps.astype(_I8, copy=False).tobytes(),
        times.astype(_F8, copy=False).tobytes(),
        values.astype(_F8, copy=False).tobytes(),
        seqs,
    )


def _commit_table(seqs: bytes) -> tuple[Int64s, Int64s]:
    table = np.frombuffer(seqs, dtype=_I8)
    half = len(table) // 2
    return table[:half], table[half:]


def _commits(chunk: Chunk) -> Int64s:
    if chunk.seqs is None:
        return np.array([chunk.seq_hi], dtype=_I8)
    return _commit_table(chunk.seqs)[0]


def _counts(chunk: Chunk) -> Int64s:
    if chunk.seqs is None:
        return np.array([chunk.n], dtype=_I8)
    return np.diff(_commit_table(chunk.seqs)[1], prepend=0)


def _finite_range(values: Float64s) -> tuple[float | None, float | None]:
    is_finite = np.isfinite(values)
    if is_finite.all():  # the usual case: no copy
        return float(values.min()), float(values.max())
    finite = values[is_finite]
    if len(finite) == 0:
        return None, None
    return float(finite.min()), float(finite.max())
