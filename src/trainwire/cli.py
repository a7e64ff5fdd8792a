"""The ``trainwire`` command."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from trainwire import __version__
from trainwire.exceptions import ConfigError, TrainwireError
from trainwire.settings import Settings, check_port, check_seconds

__all__ = ["main"]

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    """Run the ``trainwire`` command line; returns the exit status."""
    try:
        env = Settings.from_env()
    except ConfigError as exc:
        print(f"trainwire: {exc}", file=sys.stderr)
        return 2
    parser = _parser(env)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        match args.command:
            case "serve":
                return _serve(args, env)
            case "stop":
                from trainwire.server.runner import stop as stop_server

                url = stop_server(args.data)
                print(
                    f"stopped the trainwire server at {url}"
                    if url
                    else "no trainwire server running"
                )
                return 0
            case "sync":
                return _sync(args.path, args.url, args.timeout, env)
            case "token":
                return _token(args, env)
            case "demo":
                from trainwire.demo import run_demo

                return run_demo(epochs=args.epochs, url=args.url)
    except TrainwireError as exc:
        print(f"trainwire: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2  # parser.error exits; mypy does not know that


def _parser(env: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainwire", description="Live training monitor.")
    parser.add_argument("--version", action="version", version=f"trainwire {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    data_help = "data directory (default %(default)s)"

    serve = commands.add_parser("serve", help="run the server and dashboard")
    serve.add_argument("--host", default=env.host, help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=_port, default=env.port, help="port; 0 picks one (default %(default)s)"
    )
    serve.add_argument("--data", type=Path, default=env.data_dir, help=data_help)
    serve.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=env.heartbeat_timeout,
        help="seconds with no trainer before a run is marked crashed (default %(default)s)",
    )
    serve.add_argument(
        "--token",
        default=env.token,
        help="the admin token (default: TRAINWIRE_TOKEN, else one kept in the data directory)",
    )
    serve.add_argument(
        "--no-auth", action="store_true", help="no authentication (loopback addresses only)"
    )
    serve.add_argument("--certfile", type=Path, help="TLS certificate (PEM): serve https and wss")
    serve.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another origin allowed to open dashboard sockets (a reverse proxy's); repeatable",
    )
    serve.add_argument("--port-fallback", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    stop = commands.add_parser("stop", help="stop the server of a data directory")
    stop.add_argument("--data", type=Path, default=env.data_dir, help=data_help)

    sync = commands.add_parser("sync", help="upload run files written offline")
    sync.add_argument("path", type=Path, help="a .twrun file, or a folder of them")
    sync.add_argument("--url", default=None, help="server URL (default: TRAINWIRE_URL or local)")
    # Checked: NaN and inf reached Thread.join, a traceback after the upload began.
    sync.add_argument("--timeout", type=_sync_seconds, default=60.0, help="seconds per file")

    token = commands.add_parser("token", help="make, list and revoke share tokens")
    token.add_argument("--data", type=Path, default=env.data_dir, help=data_help)
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a token and print a link that carries it")
    create.add_argument("--scope", choices=["read", "write", "admin"], default="read")
    create.add_argument("--expires", default=None, help="lifetime: 30m, 12h, 7d; default never")
    create.add_argument("--note", default="", help="what the token is for")
    revoke = actions.add_parser("revoke", help="revoke a token by its id (or the token itself)")
    revoke.add_argument("token")
    actions.add_parser("list", help="list tokens (ids, scopes, expiry; never the tokens)")

    demo = commands.add_parser("demo", help="train a small CNN on the digits data, live")
    demo.add_argument("--epochs", type=int, default=None, help="epochs (default: about a minute)")
    demo.add_argument("--url", default=None, help="server URL (default: TRAINWIRE_URL or local)")
    return parser


def _checked(
    convert: Callable[[str], T], check: Callable[[T, str], T], flag: str, what: str
) -> Callable[[str], T]:
    """An argparse type: ``text`` converted, then checked; either failure one line."""

    def parse(text: str) -> T:
        try:
            return check(convert(text), flag)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_port = _checked(int, check_port, "--port", "a port number")
_seconds = _checked(float, check_seconds, "--heartbeat-timeout", "seconds")
_sync_seconds = _checked(float, check_seconds, "--timeout", "seconds")


def _serve(args: argparse.Namespace, env: Settings) -> int:
    from trainwire.server.runner import serve

    if (args.certfile is None) != (args.keyfile is None):
        raise ConfigError("--certfile and --keyfile go together")
    settings = Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data,
        heartbeat_timeout=args.heartbeat_timeout,
        token=args.token,
        auth=not args.no_auth,
        certfile=args.certfile,
        keyfile=args.keyfile,
        allowed_origins=tuple(args.allow_origin),
        limits=env.limits,
    )
    serve(settings, port_fallback=args.port_fallback, ready_fd=args.ready_fd)
    return 0


def _sync(path: Path, url: str | None, timeout: float, env: Settings) -> int:
    from trainwire.client.run import _ingest_url, resolve_server
    from trainwire.client.sync import run_files, upload

    if not path.exists():
        # Before looking for a server: a mistyped path must not start one.
        print(f"trainwire: cannot open {path}: no such file or folder", file=sys.stderr)
        return 1
    files = run_files(path)
    if not files:
        print(f"trainwire: no run files under {path}", file=sys.stderr)
        return 1
    server, token = resolve_server(url, None, env.data_dir)
    _ingest_url(server)  # a bad URL: one error here, not one per file below
    failed = 0
    for file in files:
        try:
            done = upload(file, server, timeout, token)
        except ConfigError as exc:
            # One unreadable file (cut short before its header, or no run file) must
            # not keep the folder's other runs from the server.
            print(f"{file}: NOT uploaded: {exc}")
            failed += 1
            continue
        said = "stored" if done.complete else "NOT confirmed"
        if done.refused_values:
            said += f" ({done.refused_values} values not stored: the run has its most keys)"
        print(f"{file}: run {done.run_id}, {done.rows} rows: {said}")
        failed += not done.complete
    return 1 if failed else 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``.

    Raises:
        ConfigError: not such a duration.
    """
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"a duration looks like 30m, 12h or 7d, not {text!r}")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0:  # a token made already expired
        raise ConfigError(f"a duration must be more than 0, not {text!r}")
    return seconds


def _token(args: argparse.Namespace, env: Settings) -> int:
    from trainwire.client.local import read_discovery
    from trainwire.storage.tokens import TokenStore

    database = args.data / "trainwire.db"
    if args.action != "create" and not database.exists():
        # A mistyped --data: say so, rather than list the empty store it would make.
        print(f"trainwire: no trainwire data in {args.data} yet; is --data right?", file=sys.stderr)
    tokens = TokenStore(database)
    try:
        now = time.time()
        if args.action == "create":
            expires = now + parse_duration(args.expires) if args.expires else None
            token_id, secret = tokens.create(args.scope, now, expires, args.note)
            # For a colleague: the name other machines reach the server by, if it
            # serves them (a link to 127.0.0.1 sent them, and the secret, to their own).
            url = (
                read_discovery(args.data, "public_url")
                or read_discovery(args.data)
                or f"http://{env.host}:{env.port}"
            )
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(expires)) if expires else "never"
            print(f"token {token_id} ({args.scope}, expires {until}):")
            print(secret)
            print(f"share link: {url}/?token={secret}")
            return 0
        if args.action == "revoke":
            if tokens.revoke(args.token):
                print(f"revoked {args.token}")
                return 0
            print(f"trainwire: no token {args.token}", file=sys.stderr)
            return 1
        for info in tokens.list():
            until = "never"
            if info.expires:
                until = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.expires))
            state = "active"
            if info.revoked:
                state = "revoked"
            elif info.expires and info.expires <= now:
                state = "expired"
            print(f"{info.id}  {info.scope:5}  expires {until}  {state}  {info.note}")
        return 0
    finally:
        tokens.close()
