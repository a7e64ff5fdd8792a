"""Logging CUDA tensors: zero sync on the training thread, every value delivered.

These run only where CUDA is (never in CI, which has no GPU; they were run on a lent
H200, see the README's GPU section). The same code path on CPU tensors is covered by
``test_tensors.py`` on every run of the suite.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator

import pytest
from tests.conftest import MS, LiveServer

import trainwire
from trainwire.client.system import SystemSampler

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sync_is_an_error() -> None:
    """From now on any synchronising CUDA call (``.item()``, a blocking copy) raises."""
    with warnings.catch_warnings():  # "a prototype feature": known, and not our warning
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")


@pytest.fixture(autouse=True)
def sync_is_allowed_again() -> Iterator[None]:
    yield
    torch.cuda.set_sync_debug_mode("default")


def test_cuda_tensors_of_several_dtypes_are_logged_without_a_sync(
    live_server: LiveServer,
) -> None:
    model = torch.nn.Linear(16, 4).cuda()  # a blocking copy: before sync became an error
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 16, device="cuda")
    y = torch.randint(0, 4, (64,), device="cuda")
    run = trainwire.init(url=live_server.url)
    kept = []
    _sync_is_an_error()
    for step in range(300):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = (out.argmax(1) == y).sum()  # int64, on the GPU
        run.log({"loss": loss, "loss_bf16": loss.bfloat16(), "correct": correct, "lr": 0.1}, step)
        kept.append((loss.detach(), correct))
    torch.cuda.set_sync_debug_mode("default")
    run.finish()
    assert run.delivered
    series = live_server.store.metrics(run.id)[1]
    assert series["loss"].step == list(range(300))
    assert series["loss"].value == [loss.item() for loss, _ in kept]
    assert series["correct"].value == [float(c.item()) for _, c in kept]
    bf16 = [loss.bfloat16().float().item() for loss, _ in kept]
    assert series["loss_bf16"].value == bf16
    assert series["lr"].value == [0.1] * 300


def test_log_returns_while_the_gpu_is_still_computing_the_value(
    live_server: LiveServer,
) -> None:
    def answer() -> torch.Tensor:
        return torch.full((), 7.0, device="cuda") * 6

    # Every kernel of the path loaded once first: CUDA loads modules lazily, and a
    # first load may wait for the device, which would end the sleep below early.
    warm = trainwire.init(url=live_server.url)
    warm.log({"answer": answer()}, step=0)
    warm.finish()
    run = trainwire.init(url=live_server.url)
    stream = torch.cuda.current_stream()
    _sync_is_an_error()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead
    value = answer()
    assert not stream.query()  # the sleep is still running before log()...
    run.log({"answer": value}, step=0)
    # ...and after it: an .item() inside log() would have waited for the sleep.
    assert not stream.query()
    torch.cuda.set_sync_debug_mode("default")
    run.finish()
    assert live_server.store.metrics(run.id)[1]["answer"].value == [42.0]


def test_the_system_sampler_reads_every_gpu_through_nvml() -> None:
    samples: list[dict[str, float]] = []
    sampled = threading.Event()

    def emit(second: int, values: dict[str, float]) -> None:
        samples.append(values)
        sampled.set()

    sampler = SystemSampler(emit, interval=0.05)
    sampler.start()
    assert sampled.wait(5000 * MS), "no sample"
    sampler.stop()
    sampler.join(5000 * MS)
    values = samples[-1]
    for index in range(torch.cuda.device_count()):
        prefix = f"system/gpu{index}/"
        assert 0 <= values[prefix + "util_percent"] <= 100
        assert values[prefix + "memory_used_gb"] >= 0
        assert 0 < values[prefix + "temperature_c"] < 120
        assert values[prefix + "power_w"] > 0
