"""Min/max downsampling of one series: fewer points, and no spike vanishes.

Pure: numpy arrays in, numpy arrays out; no I/O. The step range is cut into equal-width
buckets, and each bucket keeps its lowest and its highest point; the range's first and
last points are kept too. A chart of a loss
that spiked once, or went NaN once, still shows it at any zoom level; an average or an
every-nth sample would hide it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["Downsampled", "bucket_count", "buckets_of", "downsample"]

Int64s = npt.NDArray[np.int64]
Float64s = npt.NDArray[np.float64]

_INT64_MAX = 2**63 - 1


class Downsampled(NamedTuple):
    """What :func:`downsample` keeps: a subset of the input, in input order."""

    steps: Int64s
    times: Float64s
    values: Float64s
    sampled: bool  # False: every input point, untouched


def bucket_count(points: int) -> int:
    """Buckets for at most ``points`` points: each keeps up to two, and from 4 points
    on, two more are kept for the range's first and last points."""
    return max(1, (points - 2) // 2) if points >= 4 else max(1, points // 2)


def buckets_of(steps: Int64s, start: int, end: int, buckets: int) -> Int64s:
    """The bucket of each step: ``floor((step - start) * buckets / (end - start + 1))``.

    ``steps`` must lie within ``[start, end]``. The result never decreases along a
    step-sorted array, so every bucket is one contiguous slice of it.
    """
    span = end - start + 1  # a Python int: no overflow for any pair of int64 steps
    if span <= _INT64_MAX // buckets:
        # Exact in int64: (step - start) < span, so the product stays below 2**63.
        offset = steps - np.int64(start)
        return (offset * np.int64(buckets)) // np.int64(span)
    # Steps spread over most of the int64 range: floats lose the last digits of the
    # step, which moves a point at most into a neighbouring bucket, and keep the
    # order (every operation here is monotonic), so buckets stay contiguous.
    scaled = (steps.astype(np.float64) - float(start)) * (buckets / float(span))
    return np.clip(np.floor(scaled), 0, buckets - 1).astype(np.int64)


def downsample(
    steps: Int64s, times: Float64s, values: Float64s, *, points: int, start: int, end: int
) -> Downsampled:
    """At most ``points`` points of a series, keeping each bucket's extremes.

    Args:
        steps, times, values: one series, already limited to ``[start, end]`` and
            sorted by step (points of equal step in logging order).
        points: the most points wanted (at least 2).
        start, end: the step range the buckets divide (inclusive); a chart's x range.

    Returns:
        every point, with ``sampled=False``, when there are no more than ``points``.
        Otherwise ``[start, end]`` is split into ``points // 2`` buckets of equal
        width in steps, and each bucket that holds a point keeps its lowest-value
        point and its highest-value point (one point when they are the same), in
        step order, with ``sampled=True``. ±Infinity take part in the minimum and
        maximum; NaN is ignored, except that a bucket holding nothing but NaN keeps
        its first point, so a chart can still show the gap. From 4 ``points`` on,
        the buckets are ``(points - 2) // 2`` and the first and the last point are
        kept too: the line reaches both ends of the range, and the newest value
        (a chart's caption, a dashboard following the run) is the one logged last,
        not only its bucket's extreme.
    """
    count = len(steps)
    if count <= points:
        return Downsampled(steps, times, values, False)
    buckets = buckets_of(steps, start, end, bucket_count(points))
    # Where each non-empty bucket begins: buckets never decrease along the array.
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(buckets)) + 1))
    lengths = np.diff(np.append(firsts, count))
    group = np.repeat(np.arange(len(firsts)), lengths)  # each point's bucket, renumbered

    nan = np.isnan(values)
    # reduceat would let NaN win every comparison: stand it in with the value that
    # can never beat a real one...
    low = np.where(nan, np.inf, values)
    high = np.where(nan, -np.inf, values)
    lowest = np.minimum.reduceat(low, firsts)[group]
    highest = np.maximum.reduceat(high, firsts)[group]
    # ...and let the stand-in be chosen only where the bucket has nothing else.
    eligible = ~nan | np.logical_and.reduceat(nan, firsts)[group]
    keep = np.union1d(
        _first_per_group(np.flatnonzero((low == lowest) & eligible), group),
        _first_per_group(np.flatnonzero((high == highest) & eligible), group),
    )
    if points >= 4:
        keep = np.union1d(keep, [0, count - 1])
    return Downsampled(steps[keep], times[keep], values[keep], True)


def _first_per_group(positions: Int64s, group: Int64s) -> Int64s:
    """The first of ``positions`` (ascending) in each group that has one."""
    groups = group[positions]
    return positions[np.concatenate(([True], groups[1:] != groups[:-1]))]
