"""The batched tensor path, on the CPU: the same code a GPU run takes, minus the event."""

from __future__ import annotations

import subprocess
import sys
import weakref
from collections import deque
from typing import Any

import pytest
from tests.conftest import LiveServer

import trainwire
from trainwire.client.sender import Sender
from trainwire.client.tensors import Logged, TensorResolver, is_tensor, read_cpu_scalars
from trainwire.protocol.messages import RunSpec
from trainwire.protocol.session import ClientSession

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


def test_log_reads_one_number_cpu_tensors_at_once_and_keeps_no_reference() -> None:
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2).sum()
    alive = weakref.ref(loss)
    values: dict[str, Any] = {"loss": loss, "n": torch.tensor(7), "acc": 0.5, "v": torch.ones(2)}
    assert not read_cpu_scalars(values)  # an int and a vector are left: not plain
    assert values["loss"] == 6.0 and type(values["loss"]) is float
    assert values["n"] == 7 and values["acc"] == 0.5
    assert is_tensor(values["v"])  # not one number: left for the sender to refuse
    del loss
    assert alive() is None  # nothing logged keeps the tensor, or its graph, alive


def test_a_row_is_plain_once_its_cpu_tensors_are_read_and_only_then() -> None:
    assert read_cpu_scalars({"loss": torch.tensor(0.5), "lr": 0.1})
    assert not read_cpu_scalars({"n": torch.tensor(3)})  # an integer tensor gives an int
    assert not read_cpu_scalars({"loss": torch.tensor(0.5), 7: 0.1})  # a key that is no str
    assert not read_cpu_scalars({"step": 3})


def test_cpu_tensors_logged_arrive_as_their_values(live_server: LiveServer) -> None:
    run = trainwire.init(url=live_server.url)
    weight = torch.ones(3, requires_grad=True)
    for step in range(3):
        run.log({"loss": (weight * step).sum(), "n": torch.tensor(step), "v": torch.ones(2)})
    run.finish()
    series = live_server.store.metrics(run.id)[1]
    assert series["loss"].value == [0.0, 3.0, 6.0]
    assert series["n"].value == [0.0, 1.0, 2.0]
    assert "v" not in series and run._sender.dropped_values == 3


def test_nested_dicts_are_logged_under_slash_joined_keys(live_server: LiveServer) -> None:
    """{"train": {"loss": x}}, as wandb's users log, was dropped as "dict is not a
    number". It is "train/loss" now ("/" groups charts), copied in log(): a dict the
    caller reuses after log() returns does not change what was logged."""
    run = trainwire.init(url=live_server.url)
    weight = torch.ones(3, requires_grad=True)
    reused: dict[str, Any] = {"acc": 0.5}
    too_deep: dict[str, Any] = {}
    too_deep["self"] = too_deep
    for step in range(3):
        reused["acc"] = step / 10
        run.log({"train": {"loss": (weight * step).sum(), "eval": reused}, "lr": 0.1}, step=step)
        run.log({"only": {"plain": float(step)}}, step=step)
        reused["acc"] = -1.0  # after log() returned
    run.log({"loop": too_deep, "x": 1.0}, step=3)
    run.finish()
    series = live_server.store.metrics(run.id)[1]
    assert series["train/loss"].value == [0.0, 3.0, 6.0]
    assert series["train/eval/acc"].value == [0.0, 0.1, 0.2]
    assert series["only/plain"].value == [0.0, 1.0, 2.0]
    assert series["lr"].value == [0.1] * 3 and series["x"].value == [1.0]
    assert run._sender.dropped_values == 1  # the map past 8 levels


def test_log_keeps_an_accelerator_tensor_with_its_version_counter() -> None:
    """A tensor not on the CPU (here the meta device) is read later, by the sender:
    log() notes its version, to tell a change in place from the logged value."""
    on_device = torch.ones((), device="meta")
    values: dict[str, Any] = {"w": on_device, "lr": 0.1}
    assert not read_cpu_scalars(values)
    logged = values["w"]
    assert isinstance(logged, Logged) and logged.tensor is on_device
    assert not logged.changed
    on_device.add_(1.0)
    assert logged.changed


def test_a_tensor_changed_in_place_after_log_is_dropped_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The copy would read the new value: a wrong number is worse than a missing one.
    Unchanged tensors of the same rows still arrive."""
    session = ClientSession(RunSpec(id="r", project="p", name="n"))
    sender = Sender(session, deque(), None)
    weight, loss = torch.ones(()), torch.tensor(2.0)
    for step in range(2):  # as Run.log queues a GPU tensor
        sender.queue.append((step, 1.0, {"w": Logged(weight), "loss": Logged(loss)}, False))
    weight.zero_()  # the optimizer's step, before the sender's next drain
    with caplog.at_level("WARNING", logger="trainwire.client"):
        sender._drain()
    [batch] = session.outbox.items(1, 10)
    assert batch.rows == [(0, 1.0, {"loss": 2.0}), (1, 1.0, {"loss": 2.0})]
    assert sender.dropped_values == 2
    assert sum("changed in place" in r.getMessage() for r in caplog.records) == 1


def test_a_tensor_that_cannot_be_copied_drops_its_value_not_the_rows_beside_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value the sender cannot read (here a meta tensor: no data to copy) is one bad
    value: it is dropped and said, as a string would be. Raised out of the drain, it
    took every row drained with it (popped from the queue, never counted), under a
    warning about writing the run file."""
    session = ClientSession(RunSpec(id="r", project="p", name="n"))
    sender = Sender(session, deque(), None)
    bad = torch.tensor(1.0, device="meta")
    sender.queue.append((0, 1.0, {"x": 0.0}))
    sender.queue.append((1, 1.0, {"x": 1.0, "bad": Logged(bad)}, False))
    sender.queue.append((2, 1.0, {"x": 2.0}))
    with caplog.at_level("WARNING", logger="trainwire.client"):
        sender._drain_retrying()
    rows = [row for batch in session.outbox.items(1, 10) for row in batch.rows]
    assert [(step, values) for step, _, values in rows] == [
        (0, {"x": 0.0}),
        (1, {"x": 1.0}),
        (2, {"x": 2.0}),
    ]
    assert sender.dropped_values == 1
