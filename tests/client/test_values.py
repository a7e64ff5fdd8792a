from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from trainwire.client.values import to_float


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, 1.5),
        (3, 3.0),
        (True, 1.0),
        (np.float32(0.25), 0.25),
        (np.int64(7), 7.0),
        (np.array(2.5), 2.5),
        (math.inf, math.inf),
        (Fraction(1, 4), 0.25),
        (Decimal("0.5"), None),  # not a number type we know, and has no .item()
        ("1.5", None),
        (b"1", None),
        (None, None),
        ([1.0], None),
        (np.array([1.0, 2.0]), None),
        (10**400, None),
    ],
)
def test_to_float_accepts_numbers_and_refuses_the_rest(
    value: object, expected: float | None
) -> None:
    assert to_float(value) == expected


def test_to_float_keeps_nan() -> None:
    assert math.isnan(to_float(np.float64("nan")))  # type: ignore[arg-type]


def test_to_float_takes_torch_tensors_without_torch_in_the_core() -> None:
    torch = pytest.importorskip("torch")
    loss = (torch.ones(3, requires_grad=True) * 2).mean()
    assert to_float(loss) == 2.0
    assert to_float(torch.tensor(3, dtype=torch.int64)) == 3.0
    assert to_float(torch.ones(2)) is None
