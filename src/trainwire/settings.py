"""Settings, passed in explicitly; :meth:`Settings.from_env` reads ``TRAINWIRE_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import platformdirs

from trainwire.exceptions import ConfigError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Settings", "default_data_dir"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``TRAINWIRE_DATA``, else the per-user data directory (``~/.local/share/trainwire``
    on Linux)."""
    env = os.environ if env is None else env
    if env.get("TRAINWIRE_DATA"):
        return Path(env["TRAINWIRE_DATA"]).expanduser()
    return Path(platformdirs.user_data_dir("trainwire", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Server settings.

    Attributes:
        host: the address to bind; loopback by default.
        port: the port; 0 picks a free one.
        data_dir: holds ``trainwire.db`` and the ``server.json`` discovery file.
        max_frame_bytes: the largest WebSocket frame accepted from a trainer.
        dashboard_queue: live events held per dashboard before it is caught up
            from storage instead.
        heartbeat_timeout: a running run with no trainer connected for this many
            seconds is marked ``crashed``.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    max_frame_bytes: int = 16 * 1024 * 1024
    dashboard_queue: int = 1024
    heartbeat_timeout: float = 60.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "trainwire.db"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``TRAINWIRE_HOST``, ``TRAINWIRE_PORT``, ``TRAINWIRE_DATA`` and
        ``TRAINWIRE_HEARTBEAT_TIMEOUT``.

        Raises:
            ConfigError: a variable does not parse.
        """
        env = os.environ if env is None else env
        port = env.get("TRAINWIRE_PORT", str(DEFAULT_PORT))
        try:
            port_number = int(port)
        except ValueError:
            raise ConfigError(f"TRAINWIRE_PORT must be a port number, not {port!r}") from None
        timeout = env.get("TRAINWIRE_HEARTBEAT_TIMEOUT", "60")
        try:
            heartbeat_timeout = float(timeout)
        except ValueError:
            raise ConfigError(
                f"TRAINWIRE_HEARTBEAT_TIMEOUT must be seconds, not {timeout!r}"
            ) from None
        return cls(
            host=env.get("TRAINWIRE_HOST", DEFAULT_HOST),
            port=port_number,
            data_dir=default_data_dir(env),
            heartbeat_timeout=heartbeat_timeout,
        )
