"""Where a run was started: host, OS, Python, command line, torch and GPUs.

Recorded once, by ``init()``, and shown with the run, so that a curve can be traced
back to the machine and command that drew it. Every probe is cheap and guarded: a
probe that fails leaves its field out, and :func:`collect` never raises.

Two things are never done here. torch is not imported (seconds, in a script that
may not use it): its versions are read only if the script already imported it.
And nothing asks torch about CUDA devices: that would initialize CUDA in the parent
process, and DataLoader workers forked afterwards would fail. GPU names come from
NVML instead, which leaves CUDA alone.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from trainwire import __version__

__all__ = ["collect"]

logger = logging.getLogger("trainwire.client")


def collect() -> dict[str, Any]:
    """The environment of this process, as JSON-like values.

    Returns:
        ``host``, ``os``, ``python``, ``trainwire``, ``argv``, ``pid``; ``torch`` and
        ``cuda`` when torch is already imported; ``gpus`` (names) and
        ``nvidia_driver`` when NVML finds an NVIDIA driver. A field whose probe
        failed is missing.
    """
    env: dict[str, Any] = {}
    for probe in _PROBES:
        try:
            env.update(probe())
        except Exception:  # noqa: BLE001 - a missing field must never stop init()
            logger.debug("trainwire: environment probe %s failed", probe.__name__, exc_info=True)
    return env


def _basics() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "trainwire": __version__,
        "pid": os.getpid(),
    }


def _command_line() -> dict[str, Any]:
    return {"argv": [str(arg) for arg in sys.argv]}


def _torch() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    # torch.version.cuda is the CUDA version torch was built with: a constant, which
    # initializes nothing (None on CPU builds).
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda}


def _gpus() -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = [
            _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
        return {"gpus": names, "nvidia_driver": _text(pynvml.nvmlSystemGetDriverVersion())}
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases answer bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


_PROBES: list[Callable[[], dict[str, Any]]] = [_basics, _command_line, _torch, _gpus]
