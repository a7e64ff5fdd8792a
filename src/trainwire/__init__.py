"""trainwire: live training metrics, from the training loop to every open browser.

::

    import trainwire
    run = trainwire.init(project="digits", config={"lr": 3e-3})
    run.log({"train/loss": loss}, step=step)
    run.finish()
"""

from __future__ import annotations

__version__ = "0.1.0"

from trainwire.client.run import Run, finish, init, log
from trainwire.exceptions import (
    ConfigError,
    ProtocolError,
    StorageError,
    TrainwireError,
    TransientError,
    TransportError,
    VersionMismatch,
)

__all__ = [
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
