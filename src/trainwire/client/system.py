"""System metrics, sampled once a second on a thread of their own and logged on the
run's ordinary non-blocking path: CPU, RAM, and on NVIDIA machines each GPU's
utilization, memory, temperature and power (through NVML, ``nvidia-ml-py``).

Keys live under ``system/`` (``system/gpu0/util_percent``), so the dashboard gives
them a group of their own; their step is the sample's second since ``init()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SystemSampler", "read_gpus"]

logger = logging.getLogger("trainwire.client")

Emit = Callable[[int, dict[str, float]], None]


class SystemSampler(threading.Thread):
    """Calls ``emit(second, values)`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, emit: Emit, interval: float = 1.0) -> None:
        super().__init__(name="trainwire-system", daemon=True)
        self.emit = emit
        self.interval = interval
        self._stopped = threading.Event()
        self._gpus = _Gpus()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        import psutil

        process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first reading only starts the clock
        second = 0
        try:
            while not self._stopped.wait(self.interval):
                second += 1
                memory = psutil.virtual_memory()
                values = {
                    "system/cpu_percent": psutil.cpu_percent(interval=None),
                    "system/ram_percent": memory.percent,
                    "system/ram_used_gb": (memory.total - memory.available) / 2**30,
                    "system/process_rss_gb": process.memory_info().rss / 2**30,
                }
                values.update(self._gpus.read())
                self.emit(second, values)
        except Exception:  # a sampler must never take anything down with it
            logger.warning("trainwire system metrics stopped", exc_info=True)
        finally:
            self._gpus.close()


class _Gpus:
    """NVML, if there is an NVIDIA driver; nothing otherwise."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except Exception:  # no driver, no GPU, no library: no GPU metrics  # noqa: BLE001
            self._nvml = None

    def read(self) -> dict[str, float]:
        if self._nvml is None:
            return {}
        return read_gpus(self._nvml, self._handles)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down, nothing left to protect
                pass


def read_gpus(nvml: Any, handles: list[Any]) -> dict[str, float]:
    """One sample of every GPU; a reading a GPU does not support is left out."""
    values: dict[str, float] = {}
    for index, handle in enumerate(handles):
        prefix = f"system/gpu{index}/"
        for name, read in _READINGS.items():
            try:
                values[prefix + name] = read(nvml, handle)
            except Exception:  # noqa: BLE001 - e.g. NVML_ERROR_NOT_SUPPORTED on some boards
                continue
    return values


def _util(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _memory(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**30


def _temperature(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))


def _power(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0  # milliwatts


_READINGS: dict[str, Callable[[Any, Any], float]] = {
    "util_percent": _util,
    "memory_used_gb": _memory,
    "temperature_c": _temperature,
    "power_w": _power,
}
