"""What init() records about where a run was started."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from tests.conftest import MS, LiveServer

import trainwire
from trainwire import __version__
from trainwire.client import environment


def test_the_environment_names_host_python_command_and_process() -> None:
    env = environment.collect()
    assert env["trainwire"] == __version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["argv"] == sys.argv and env["pid"] > 0 and env["host"] and env["os"]
    assert json.loads(json.dumps(env)) == env  # stored as JSON


def test_collecting_never_imports_torch() -> None:
    """Importing torch takes seconds; a script that does not use it must not pay."""
    code = (
        "import sys; from trainwire.client import environment; env = environment.collect(); "
        "print('torch' in sys.modules, 'torch' in env)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_torch_versions_are_read_from_an_already_imported_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = SimpleNamespace(__version__="2.13.0+cu128", version=SimpleNamespace(cuda="12.8"))
    monkeypatch.setitem(sys.modules, "torch", fake)
    env = environment.collect()
    assert (env["torch"], env["cuda"]) == ("2.13.0+cu128", "12.8")


class FakeNVML:
    """Two GPUs, answering names as bytes as older nvidia-ml-py releases do."""

    def __init__(self) -> None:
        self.open = False

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.open = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.open = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:  # noqa: N802
        return [b"NVIDIA H100 80GB HBM3", "NVIDIA H200"][handle]

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "570.86.15"


def test_gpus_are_named_through_nvml_which_is_closed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    env = environment.collect()
    assert env["gpus"] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert env["nvidia_driver"] == "570.86.15" and not nvml.open


def test_a_failing_probe_leaves_its_fields_out_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("no such thing")

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(environment, "_PROBES", [broken, *environment._PROBES])
    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(nvmlInit=no_driver))
    env = environment.collect()
    assert env["trainwire"] == __version__ and "gpus" not in env


def test_credentials_on_the_command_line_are_masked() -> None:
    argv = [
        "train.py",
        "--token",
        "s3cret",
        "--db-password=hunter2",
        "HF_TOKEN=abc",
        "--lr",
        "0.1",
        "--api_key",
        "k",
        "tokenizer.json",
    ]
    assert environment.redact_argv(argv) == [
        "train.py",
        "--token",
        "***",
        "--db-password=***",
        "HF_TOKEN=***",
        "--lr",
        "0.1",
        "--api_key",
        "***",
        "tokenizer.json",
    ]


def test_a_command_line_argument_that_is_not_utf8_costs_nothing(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux hands Python undecodable bytes in argv as lone surrogates
    (``python train.py --out=caf$'\\xe9'`` in a UTF-8 locale): the run must still
    be recorded, with an argv that JSON and msgpack can carry."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--out=caf\udce9"])
    env = environment.collect()
    json.dumps(env).encode()  # what the server stores; raises on a lone surrogate
    run = trainwire.init(url=live_server.url)
    run.log({"loss": 1.0})
    run.finish(timeout=10_000 * MS)
    assert run.delivered
    assert live_server.store.get_run(run.id) is not None
