"""Rows as logged, to columns as charted, and the JSON spelling of their values."""

from __future__ import annotations

from collections.abc import Iterable

from trainwire.protocol.messages import Row, Series, json_value

__all__ = ["series_from_rows", "spelled"]


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


def spelled(series: dict[str, Series]) -> dict[str, Series]:
    """The same series with NaN and ±Infinity spelled as JSON strings, in place."""
    for entry in series.values():
        entry.value = [json_value(v) if isinstance(v, float) else v for v in entry.value]
    return series
