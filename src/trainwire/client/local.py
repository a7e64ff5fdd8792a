"""Finding the user's local trainwire server, or starting one.

The local server is its own process, never a thread of the training script: it
must not compete with training for the GIL, and the dashboard must outlive the
script. One server serves each data directory (the server holds a lock on it),
so concurrent scripts share it instead of racing to start several.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import select
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Final

from trainwire.client.notice import notice
from trainwire.client.sender import direct_opener, tls_context
from trainwire.exceptions import TransientError
from trainwire.settings import (
    DEFAULT_PORT,
    DISCOVERY_FILE,
    LOCK_FILE,
    READY_JOINED,
    TOKEN_FILE,
    make_private_dir,
)

__all__ = ["ensure_local_server", "is_trainwire", "local_token", "read_discovery"]

logger = logging.getLogger("trainwire.client")


_LAUNCHER: Final = (
    "import subprocess, sys; "
    "subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True, "
    "pass_fds=(int(sys.argv[sys.argv.index('--ready-fd') + 1]),))"
)


def is_trainwire(url: str, timeout: float = 2.0) -> bool:
    """Whether a trainwire server answers at ``url`` (``http://host:port``): one that
    says so on ``/api/health``, or asks for a trainwire token there.

    Asked directly, as the trainer's WebSocket connects: through a cluster's
    ``http_proxy`` (set without ``no_proxy``) a server on this machine looked absent,
    and every ``init()`` started another, to find the first holding its data."""
    try:
        context = tls_context() if url.startswith("https:") else None
        with direct_opener(context).open(f"{url}/api/health", timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        realm = exc.headers.get("www-authenticate", "")
        exc.close()
        return exc.code == 401 and 'realm="trainwire"' in realm
    except (OSError, ValueError, http.client.HTTPException):  # the last: no HTTP there
        return False
    return isinstance(body, dict) and body.get("app") == "trainwire"


def local_token(data_dir: Path) -> str | None:
    """The local server's admin token, made on its first start."""
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def read_discovery(data_dir: Path, field: str = "url") -> str | None:
    """The URL a server serving ``data_dir`` wrote down, if any: the one this machine
    reaches it by, or with ``field="public_url"`` the one other machines do (only
    for a server bound to every interface)."""
    try:
        info = json.loads((data_dir / DISCOVERY_FILE).read_text())
    except (OSError, ValueError):
        return None
    url = info.get(field) if isinstance(info, dict) else None
    return url if isinstance(url, str) else None


def _held(data_dir: Path) -> bool:
    """Whether a server process holds ``data_dir`` (its lock) right now. Shared, and
    for an instant: a server starting meanwhile tries again (runner._take_lock)."""
    try:
        with open(data_dir / LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def ensure_local_server(data_dir: Path, port: int = DEFAULT_PORT, timeout: float = 15.0) -> str:
    """The URL of the server for ``data_dir``, started in the background if none runs.

    Returns:
        ``http://127.0.0.1:PORT``; ``port`` is preferred, any free one is taken if busy.

    Raises:
        TransientError: no server could be started within ``timeout`` seconds.
    """
    url = read_discovery(data_dir)
    # A server.json left by a server that died without cleaning up (SIGKILL, a
    # reboot) names a port anyone may hold now: believed only while our server lives,
    # or the token in the data directory would be sent to whoever answers there.
    if url is not None and _held(data_dir) and is_trainwire(url):
        return url
    # Private: the folder holds the token, and the log prints the link carrying it.
    make_private_dir(data_dir)
    read_end, write_end = os.pipe()
    log_fd = os.open(data_dir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log = os.fdopen(log_fd, "ab")
    try:
        command = [
            sys.executable,
            "-m",
            "trainwire",
            "serve",
            "--data",
            str(data_dir),
            "--port",
            str(port),
            "--port-fallback",
            "--ready-fd",
            str(write_end),
        ]
        # Started through a short-lived launcher that we wait for: the server is then
        # nobody's child here (no zombie, no "still running" warning when this
        # script's Popen is collected), in a session of its own, so it outlives this
        # script and its terminal's Ctrl-C.
        launcher = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_end,),
        )
        launcher.wait(timeout)
    finally:
        os.close(write_end)
        log.close()
    try:
        # The child writes its URL once its socket listens, then closes the pipe.
        chunks = []
        while True:
            ready, _, _ = select.select([read_end], [], [], timeout)
            if not ready:
                raise TransientError(f"trainwire server did not start in {timeout:g} s")
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    url, _, joined = b"".join(chunks).decode().strip().partition(" ")
    if not url:
        raise TransientError(f"trainwire server failed to start; see {data_dir / 'server.log'}")
    if joined == READY_JOINED:  # another process started it a moment before us
        logger.info("trainwire: using the server at %s", url)
    else:
        notice(
            logger,
            "trainwire: started a server at %s (it keeps running; trainwire stop ends it)",
            url,
        )
    return url
