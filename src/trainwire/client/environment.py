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
from typing import Any, Final

from trainwire import __version__

__all__ = ["collect"]

logger = logging.getLogger("trainwire.client")


def collect() -> dict[str, Any]:
    """The environment of this process, as JSON-like values.

    Returns:
        ``host``, ``os``, ``python``, ``trainwire``, ``argv`` (credential-like
        option values masked: :func:`redact_argv`), ``pid``; ``torch`` and
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
    return {key: _utf8(value) for key, value in env.items()}


def _utf8(value: Any) -> Any:
    """``value`` with every string encodable as UTF-8: Linux hands Python the
    undecodable bytes of an argument (or a host name) as lone surrogates, which
    msgpack and JSON refuse, and the run's hello with them. Such a character is
    written as its escape (``\\udce9``): the value stays readable, nothing is lost."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_utf8(item) for item in value]
    return value


def _basics() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "trainwire": __version__,
        "pid": os.getpid(),
    }


# Command-line options whose value is a credential: anyone who may read the run
# (a share token with read scope) sees its environment, so these are masked.
_SECRET_WORDS: Final = ("token", "password", "passwd", "secret", "api-key", "api_key", "apikey")
MASK: Final = "***"


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of credential-like options masked: ``--token T``,
    ``--token=T``, ``--db-password=T``, ``HF_TOKEN=T``."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        name, eq, _ = arg.partition("=")
        secret = any(word in name.lower() for word in _SECRET_WORDS)
        if secret and eq:
            out.append(f"{name}={MASK}")
        else:
            out.append(arg)
            mask_next = secret and arg.startswith("-")
    return out


def _command_line() -> dict[str, Any]:
    return {"argv": redact_argv([str(arg) for arg in sys.argv])}


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
