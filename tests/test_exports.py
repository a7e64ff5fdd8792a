from __future__ import annotations

import subprocess
import sys

import trainwire


def test_the_public_api_is_exactly_this() -> None:
    assert sorted(trainwire.__all__) == sorted(
        [
            "ConfigError",
            "ProtocolError",
            "Run",
            "StorageError",
            "TrainwireError",
            "TransientError",
            "TransportError",
            "VersionMismatch",
            "__version__",
            "finish",
            "init",
            "log",
        ]
    )
    for name in trainwire.__all__:
        assert hasattr(trainwire, name)


def test_the_core_package_does_not_import_torch_numpy_or_the_server() -> None:
    code = (
        "import sys, trainwire; "
        "heavy = ('torch', 'numpy', 'uvicorn', 'fastapi', 'sqlite3'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_protocol_core_imports_no_io() -> None:
    """The pure core: no socket, thread, clock, event loop or database, even indirectly
    through another trainwire module."""
    import ast
    from pathlib import Path

    forbidden = {"socket", "asyncio", "threading", "time", "sqlite3", "websockets", "select"}
    core = Path(trainwire.__file__).parent / "protocol"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
                if name.startswith("trainwire."):
                    assert name.startswith(("trainwire.protocol", "trainwire.exceptions")), (
                        f"{path.name} imports {name}"
                    )


def test_log_before_init_says_how_to_fix_it(monkeypatch: object) -> None:
    import pytest

    from trainwire.client import run as run_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "_current", None)
        with pytest.raises(trainwire.ConfigError, match=r"call trainwire.init\(\) before"):
            trainwire.log({"x": 1.0})
