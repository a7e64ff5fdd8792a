"""Settings, passed in explicitly; :meth:`Settings.from_env` reads ``TRAINWIRE_*``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import platformdirs

from trainwire.exceptions import ConfigError
from trainwire.protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_KEY_LENGTH,
    MAX_KEYS_PER_RUN,
    MAX_ROWS_PER_BATCH,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DISCOVERY_FILE",
    "LOCK_FILE",
    "TOKEN_FILE",
    "Limits",
    "Settings",
    "check_port",
    "check_seconds",
    "default_data_dir",
    "env_port",
    "is_loopback",
    "make_private_dir",
]

DEFAULT_HOST: Final = "127.0.0.1"
# In a data directory: the running server's URL and pid, and its admin token.
DISCOVERY_FILE: Final = "server.json"
# Held (flock) by the server of a data directory for exactly as long as it lives.
LOCK_FILE: Final = "server.lock"
TOKEN_FILE: Final = "token"
DEFAULT_PORT: Final = 8765
# Added to the URL a server started with --ready-fd hands its starter when it found
# another server holding its data directory, and so joined it instead.
READY_JOINED: Final = "joined"


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``TRAINWIRE_DATA``, else the per-user data directory (``~/.local/share/trainwire``
    on Linux)."""
    env = os.environ if env is None else env
    if env.get("TRAINWIRE_DATA"):
        return Path(env["TRAINWIRE_DATA"]).expanduser()
    return Path(platformdirs.user_data_dir("trainwire", appauthor=False))


@dataclass(frozen=True)
class Limits:
    """What one client may send. Each cap gives the offender a clear error and
    closes only its connection.

    Attributes:
        max_frame_bytes: the largest WebSocket frame from a trainer.
        max_rows_per_batch: rows (steps) in one batch.
        max_key_length: characters in a metric key.
        max_series_per_run: distinct metric keys in one run, over all its writers.
            No connection is closed for it: the values of a key past it are left
            out of their batch and the key named in the batch's ack.
        max_new_runs_per_minute: runs one token (or, without auth, one address)
            may create per minute.
        max_connections_per_address: open WebSockets from one client address.
    """

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_rows_per_batch: int = MAX_ROWS_PER_BATCH
    max_key_length: int = MAX_KEY_LENGTH
    max_series_per_run: int = MAX_KEYS_PER_RUN
    max_new_runs_per_minute: int = 60
    max_connections_per_address: int = 256


@dataclass(frozen=True)
class Settings:
    """Server settings.

    Attributes:
        host: the address to bind; loopback by default.
        port: the port; 0 picks a free one.
        data_dir: holds ``trainwire.db`` and the ``server.json`` discovery file.
        dashboard_queue: live events held per dashboard before it is caught up
            from storage instead.
        heartbeat_timeout: a running run with no trainer connected for this many
            seconds is marked ``crashed``.
        run_update_interval: while a run commits, dashboards are sent its new
            ``updated`` time at most once per this many seconds.
        token: the server's admin token; None: the one kept in ``data_dir/token``,
            made on first start.
        auth: False turns authentication off (refused on a non-loopback address).
        certfile, keyfile: serve https and wss.
        allowed_origins: origins allowed to open dashboard sockets besides the
            server's own (a reverse proxy's public origin).
        limits: caps on what one client may send.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    dashboard_queue: int = 1024
    heartbeat_timeout: float = 60.0
    run_update_interval: float = 1.0
    token: str | None = None
    auth: bool = True
    certfile: Path | None = None
    keyfile: Path | None = None
    allowed_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    @property
    def token_path(self) -> Path:
        return self.data_dir / TOKEN_FILE

    @property
    def tls(self) -> bool:
        return self.certfile is not None

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
        port_number = env_port(env)
        # Set but empty is unset (see host below): it was a ConfigError.
        timeout = env.get("TRAINWIRE_HEARTBEAT_TIMEOUT") or "60"
        try:
            heartbeat_timeout = float(timeout)
        except ValueError:
            raise ConfigError(
                f"TRAINWIRE_HEARTBEAT_TIMEOUT must be seconds, not {timeout!r}"
            ) from None
        check_seconds(heartbeat_timeout, "TRAINWIRE_HEARTBEAT_TIMEOUT")
        return cls(
            # Set but empty (`TRAINWIRE_HOST=$UNSET`) is unset, as for every variable
            # here: bound as given, "" is every interface, while the URL printed for
            # it reads 127.0.0.1.
            host=env.get("TRAINWIRE_HOST") or DEFAULT_HOST,
            port=port_number,
            data_dir=default_data_dir(env),
            heartbeat_timeout=heartbeat_timeout,
            token=env.get("TRAINWIRE_TOKEN") or None,
        )


def env_port(env: Mapping[str, str]) -> int:
    """The port ``TRAINWIRE_PORT`` names, DEFAULT_PORT without it.

    Raises:
        ConfigError: it is not a port number.
    """
    port = env.get("TRAINWIRE_PORT") or str(DEFAULT_PORT)  # set but empty: unset
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"TRAINWIRE_PORT must be a port number, not {port!r}") from None
    return check_port(number, "TRAINWIRE_PORT")


def check_port(port: int, name: str) -> int:
    """``port`` if it is one (0 picks a free one).

    Raises:
        ConfigError: not 0 to 65535.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number from 0 to 65535, not {port}")
    return port


def check_seconds(seconds: float, name: str) -> float:
    """``seconds`` if it is a positive, finite duration.

    Raises:
        ConfigError: zero, negative, NaN or infinite.
    """
    if not (0 < seconds < math.inf):
        raise ConfigError(f"{name} must be a positive number of seconds, not {seconds:g}")
    return seconds


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_private_dir(path: Path) -> None:
    """Make the folder ``path`` and its missing parents, each readable by its owner
    alone (0700, as XDG asks of a data directory made on demand): they hold runs,
    which other users of the machine must not read. ``Path.mkdir(mode=0o700,
    parents=True)`` gives the parents it makes the default mode: a data directory
    first made by a client (an offline run, a spill file) was 0755.

    Raises:
        OSError: a folder cannot be made (one of the path's names is a file).
    """
    if path.is_dir():
        return
    if path.parent != path:
        make_private_dir(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)
