from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from tests.conftest import MS, LiveServer

import trainwire
from trainwire.client.system import SystemSampler, read_gpus


def test_the_sampler_emits_cpu_and_ram_every_interval_until_stopped() -> None:
    samples: list[tuple[int, dict[str, float]]] = []
    two = threading.Event()

    def emit(second: int, values: dict[str, float]) -> None:
        samples.append((second, values))
        if len(samples) == 2:
            two.set()

    sampler = SystemSampler(emit, interval=0.01)
    sampler.start()
    assert two.wait(5000 * MS)
    sampler.stop()
    sampler.join(5000 * MS)
    assert not sampler.is_alive()
    assert [s for s, _ in samples[:2]] == [1, 2]
    values = samples[0][1]
    assert 0 <= values["system/cpu_percent"] <= 100
    assert 0 < values["system/ram_percent"] <= 100
    assert values["system/process_rss_gb"] > 0


def test_gpu_readings_map_nvml_and_leave_out_what_a_board_does_not_support() -> None:
    def unsupported(handle: Any) -> None:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    nvml = SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3 * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 64,
        nvmlDeviceGetPowerUsage=unsupported,
    )
    assert read_gpus(nvml, ["h0"]) == {
        "system/gpu0/util_percent": 87.0,
        "system/gpu0/memory_used_gb": 3.0,
        "system/gpu0/temperature_c": 64.0,
    }


def test_system_rows_have_their_own_steps_and_leave_the_training_steps_alone(
    live_server: LiveServer,
) -> None:
    run = trainwire.init(url=live_server.url)
    run._log_system(7, {"system/cpu_percent": 12.5})
    run.log({"loss": 1.0})
    run.finish()
    series = live_server.store.metrics(run.id)[1]
    assert series["system/cpu_percent"].step == [7]
    assert series["loss"].step == [0]


@pytest.mark.parametrize(
    ("value", "sampled"), [("0", False), ("", True), ("1", True), (None, True)]
)
def test_only_trainwire_system_metrics_0_turns_the_sampler_off(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, value: str | None, sampled: bool
) -> None:
    """README: `0` turns them off, default on. Set but empty turned them off too."""
    if value is None:
        monkeypatch.delenv("TRAINWIRE_SYSTEM_METRICS")
    else:
        monkeypatch.setenv("TRAINWIRE_SYSTEM_METRICS", value)
    run = trainwire.init(url=live_server.url)
    try:
        assert (run._system is not None) is sampled
    finally:
        run.finish()
