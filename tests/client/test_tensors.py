"""The batched tensor path, on the CPU: the same code a GPU run takes, minus the event."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from trainwire.client.tensors import TensorResolver, is_tensor

torch = pytest.importorskip("torch")


def test_tensors_become_floats_in_order_with_one_stack_per_device_and_dtype() -> None:
    resolver = TensorResolver()
    weight = torch.ones(3, requires_grad=True)
    rows: list[Any] = [
        (0, 1.0, {"loss": (weight * 2).sum(), "acc": torch.tensor(0.5, dtype=torch.float64)}),
        (1, 2.0, {"loss": torch.tensor(3.0), "n": torch.tensor(7), "lr": 0.1}),
        (2, 3.0, {"vector": torch.ones(2), "plain": 4}),
    ]
    resolver.submit(rows)
    assert resolver.waiting == 3
    out = resolver.ready()
    assert [r[0] for r in out] == [0, 1, 2]
    assert out[0][2] == {"loss": 6.0, "acc": 0.5}
    assert out[1][2] == {"loss": 3.0, "n": 7, "lr": 0.1}
    assert is_tensor(out[2][2]["vector"])  # not one number: left for the caller to refuse
    assert resolver.waiting == 0


def test_rows_without_tensors_pass_straight_through() -> None:
    resolver = TensorResolver()
    resolver.submit([(0, 1.0, {"x": 1.0})])
    resolver.submit([(1, 1.0, {"x": 2.0})])
    assert resolver.ready() == [(0, 1.0, {"x": 1.0}), (1, 1.0, {"x": 2.0})]


def test_is_tensor_needs_no_torch_import() -> None:
    code = (
        "import sys, numpy; from trainwire.client.tensors import is_tensor; "
        "print(is_tensor(numpy.float32(1)), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
