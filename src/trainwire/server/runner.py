"""Running the server process: the data-directory lock, the socket, uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final
from urllib.parse import quote, urlencode

import uvicorn
from starlette.types import ASGIApp

from trainwire import __version__
from trainwire.exceptions import ConfigError
from trainwire.server.app import create_app
from trainwire.settings import (
    DISCOVERY_FILE,
    LOCK_FILE,
    READY_JOINED,
    Settings,
    is_loopback,
    make_private_dir,
)
from trainwire.storage.tokens import new_secret

__all__ = [
    "AlreadyServing",
    "admin_token",
    "bind",
    "check_exposure",
    "check_tls",
    "dashboard_link",
    "machine_name",
    "serve",
    "server_url",
    "stop",
    "uvicorn_config",
]

logger = logging.getLogger("trainwire.server")


LOCK_ATTEMPTS: Final = 10


class AlreadyServing(ConfigError):
    """Another server holds this data directory."""

    def __init__(self, data_dir: Path, url: str | None) -> None:
        super().__init__(
            f"a trainwire server already serves {data_dir}" + (f" at {url}" if url else "")
        )
        self.url = url


def server_url(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def public_url(sock: socket.socket, tls: bool = False) -> str | None:
    """The URL other machines reach a server bound to every interface by (this
    machine's name), or None for one bound to an address of its own, which
    :func:`server_url` already names. Links shared with a colleague need it: one
    naming 127.0.0.1 sends them, token and all, to their own machine."""
    host, port = sock.getsockname()[:2]
    if host not in ("0.0.0.0", "::"):
        return None
    scheme = "https" if tls else "http"
    return f"{scheme}://{machine_name()}:{port}"


# The names /etc/hosts gives loopback addresses (Debian's, Red Hat's).
_LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def machine_name() -> str:
    """This machine's name as others know it: its fully qualified name, unless that
    is a loopback name, then its host name. Where ``/etc/hosts`` maps the host name
    to 127.0.0.1 (containers; ``127.0.0.1 localhost localhost.localdomain myhost``),
    ``socket.getfqdn()`` says ``localhost`` or ``localhost.localdomain``: a link
    naming it sends a colleague, token and all, to their own machine."""
    name = socket.getfqdn()
    if name.split(".", 1)[0].lower() in _LOOPBACK_NAMES:
        return socket.gethostname()
    return name


def admin_token(settings: Settings) -> str | None:
    """The server's admin token: the one given, else the one in ``data_dir/token``,
    made (readable by its owner alone) on first start. None with auth off."""
    if not settings.auth:
        return None
    if settings.token:
        return settings.token
    path = settings.token_path
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    # Empty: a first start cut short between making the file and writing it. An
    # admin token "" would match no request: make a real one instead.
    path.unlink(missing_ok=True)
    make_private_dir(path.parent)
    token = new_secret()
    # O_EXCL with mode 0600: never a moment when another user could read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def dashboard_link(url: str, token: str | None) -> str:
    """The dashboard's URL carrying ``token``, as Jupyter's does; the page then keeps it
    in a cookie, out of the address bar. Quoted: a token of ``openssl rand -base64``
    holds ``+``, which a query reads as a space, and ``/`` and ``=``."""
    return f"{url}/?{urlencode({'token': token}, quote_via=quote)}" if token else url


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without authentication anywhere but loopback.

    Raises:
        ConfigError: auth is off and the host is not a loopback address.
    """
    if not settings.auth and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve {settings.host} without authentication: anyone who can "
            "reach it could read and write every run; drop --no-auth, or bind 127.0.0.1"
        )


def check_tls(settings: Settings) -> None:
    """Load the certificate and key once up front, so that a wrong path or a bad file
    is a clear error, not a traceback from inside uvicorn after the link was printed.

    Raises:
        ConfigError: they cannot be read, or do not make a certificate chain.
    """
    if settings.certfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.certfile, settings.keyfile
        )
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(
            f"cannot load the TLS certificate {settings.certfile} and key {settings.keyfile}: "
            f"{exc.strerror or exc}"
        ) from exc


def bind(host: str, port: int, *, fallback: bool = False) -> socket.socket:
    """A listening socket. Connections made before uvicorn starts wait in its backlog,
    so the URL can be handed out as soon as this returns.

    Args:
        fallback: take any free port if ``port`` is in use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets whose
    # proto says TCP. Without it, Nagle held the second of two quick small frames
    # (an ack after an ack, a dashboard push after a push) until the peer's delayed
    # ACK, 40 ms later: finish() took 45 ms instead of 5 about half the time.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        if not (fallback and exc.errno == errno.EADDRINUSE):
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        sock.bind((host, 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[IO[str]]:
    # One server per data directory: a second one would write the same SQLite file
    # and leave dashboards on either of them blind to the other's runs.
    try:
        # Private: it holds every run and the admin token (README: 0700).
        make_private_dir(data_dir)
        handle = open(data_dir / LOCK_FILE, "a")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot use {data_dir} as the data directory: {exc.strerror}") from exc
    try:
        if not _take_lock(handle):
            url = None
            with contextlib.suppress(OSError, ValueError):
                url = json.loads((data_dir / DISCOVERY_FILE).read_text()).get("url")
            raise AlreadyServing(data_dir, url) from None
        yield handle
    finally:
        handle.close()


def _take_lock(handle: IO[str]) -> bool:
    """Lock the data directory, unless a server holds it. A client checking whether
    one does (``local._held``) holds the lock for an instant: tried a few times over
    0.1 s before the directory counts as served."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(0.01)
    return False


def serve(settings: Settings, *, port_fallback: bool = False, ready_fd: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM.

    Args:
        port_fallback: take any free port if ``settings.port`` is in use.
        ready_fd: a file descriptor to write the server's URL to, then close, once it
            listens (or the URL of the server already serving this data directory).

    Raises:
        AlreadyServing: another server holds ``settings.data_dir``.
        ConfigError: the address cannot be bound.
    """
    # From the first moment: a SIGTERM during startup must unwind too, or the
    # discovery file and the lock would be left behind.
    with _sigterm_unwinds():
        _serve(settings, port_fallback, ready_fd)


def _serve(settings: Settings, port_fallback: bool, ready_fd: int | None) -> None:
    try:
        check_exposure(settings)
        check_tls(settings)
        with _data_dir_lock(settings.data_dir):
            settings = dataclasses.replace(settings, token=admin_token(settings))
            sock = bind(settings.host, settings.port, fallback=port_fallback)
            url = server_url(sock, tls=settings.tls)
            public = public_url(sock, tls=settings.tls)
            discovery = settings.data_dir / DISCOVERY_FILE
            found = {"url": url, "pid": os.getpid(), "version": __version__}
            discovery.write_text(json.dumps({**found, "public_url": public} if public else found))
            try:
                logger.info("trainwire %s serving %s at %s", __version__, settings.data_dir, url)
                print(f"trainwire dashboard: {dashboard_link(url, settings.token)}", flush=True)
                if public:
                    link = dashboard_link(public, settings.token)
                    print(f"from other machines: {link}", flush=True)
                fd, ready_fd = ready_fd, None
                _signal_ready(fd, url)
                server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
                server.run(sockets=[sock])
            finally:
                with contextlib.suppress(OSError):
                    discovery.unlink()
                sock.close()
    except AlreadyServing as exc:
        if ready_fd is not None and exc.url:
            fd, ready_fd = ready_fd, None
            # Said as joined: ranks of one job starting at once each started "a
            # server" by their own account, while one did and the rest found it.
            _signal_ready(fd, f"{exc.url} {READY_JOINED}")
        raise
    finally:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(ready_fd)


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration for serving ``app``, built from ``settings``."""
    return uvicorn.Config(
        app,
        ssl_certfile=settings.certfile,
        ssl_keyfile=settings.keyfile,
        ws="websockets-sansio",
        ws_max_size=settings.limits.max_frame_bytes,
        # Dead trainer and dashboard connections are dropped within 15 s.
        ws_ping_interval=5.0,
        ws_ping_timeout=10.0,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the
    # previous handler; with the default one the process would die there, skipping
    # our cleanup (server.json, the lock). Unwind with SystemExit instead.
    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(0)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signal_ready(fd: int | None, url: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, url.encode())
    finally:
        os.close(fd)


def stop(data_dir: Path, timeout: float = 10.0) -> str | None:
    """Stop the server holding ``data_dir``, as SIGTERM does: it finishes what it is
    doing first.

    Returns:
        the URL it served, or None if no server holds ``data_dir``.

    Raises:
        ConfigError: it did not stop within ``timeout`` seconds.
    """
    try:
        info = json.loads((data_dir / DISCOVERY_FILE).read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The lock is held exactly as long as the server process lives: never signal a
    # pid from a stale server.json, which may belong to another process by now.
    with open(data_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return url
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the server (pid {pid}) did not stop in {timeout:g} s"
                    ) from None
                time.sleep(0.05)
