"""Turning what users log into floats, without importing torch or numpy."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["to_float"]


def to_float(value: Any) -> float | None:
    """The float a logged value stands for, or None if it is not one number.

    Accepts Python numbers, numpy scalars and 0-d (or one-element) arrays and
    tensors on any device, by duck typing: ``.item()`` is what both numpy and torch
    offer. Strings are refused even when they look numeric: a metric is a number.
    """
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)):
        return None
    try:
        if isinstance(value, numbers.Real):  # int, bool, Fraction, numpy scalars
            return float(value)
        item = getattr(value, "item", None)
        if item is None:
            return None
        number = item()
        if isinstance(number, (int, float)) and not isinstance(number, complex):
            return float(number)
    except Exception:  # noqa: BLE001 - whatever a user's object raises, it is no number
        # torch's "a Tensor with N elements cannot be converted to Scalar" (a
        # RuntimeError), a meta tensor's NotImplementedError, ...
        return None
    return None
