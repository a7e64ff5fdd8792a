"""Rows as logged, to columns as charted, and the JSON spelling of their values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

from trainwire.protocol.messages import Row, Series, json_value

__all__ = ["series_from_rows", "spelled"]

S = TypeVar("S", bound=Series)


def series_from_rows(rows: Iterable[Row]) -> dict[str, Series]:
    """Regroup ``(step, time, {key: value})`` rows into one column set per key."""
    series: dict[str, Series] = {}
    for step, time, values in rows:
        for key, value in values.items():
            entry = series.get(key)
            if entry is None:
                entry = series[key] = Series(step=[], time=[], value=[])
            entry.step.append(step)
            entry.time.append(time)
            entry.value.append(value)
    return series


def spelled(series: dict[str, S]) -> dict[str, S]:
    """The same series with NaN and ±Infinity spelled as JSON strings, in place."""
    for entry in series.values():
        if _all_finite(entry.value):
            continue
        entry.value = [json_value(v) if isinstance(v, float) else v for v in entry.value]
    return series


def _all_finite(values: list[float | str]) -> bool:
    # One C-speed pass instead of a Python call per value: a NaN or an infinity makes
    # the sum non-finite. So can an overflow of finite values, which only means the
    # slow path; a string (already spelled) means it too.
    try:
        return math.isfinite(sum(values))  # type: ignore[arg-type]
    except (TypeError, OverflowError):
        return False
