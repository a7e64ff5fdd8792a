"""The ``trainwire`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainwire import __version__
from trainwire.exceptions import TrainwireError
from trainwire.settings import Settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``trainwire`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="trainwire", description="Live training monitor.")
    parser.add_argument("--version", action="version", version=f"trainwire {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server and dashboard")
    env = Settings.from_env()
    serve.add_argument("--host", default=env.host, help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=int, default=env.port, help="port; 0 picks one (default %(default)s)"
    )
    serve.add_argument(
        "--data", type=Path, default=env.data_dir, help="data directory (default %(default)s)"
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=env.heartbeat_timeout,
        help="seconds with no trainer before a run is marked crashed (default %(default)s)",
    )
    serve.add_argument("--port-fallback", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    stop = commands.add_parser("stop", help="stop the server of a data directory")
    stop.add_argument(
        "--data", type=Path, default=env.data_dir, help="data directory (default %(default)s)"
    )

    sync = commands.add_parser("sync", help="upload run files written offline")
    sync.add_argument("path", type=Path, help="a .twrun file, or a folder of them")
    sync.add_argument("--url", default=None, help="server URL (default: TRAINWIRE_URL or local)")
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds per file")

    demo = commands.add_parser("demo", help="train a small CNN on the digits data, live")
    demo.add_argument("--epochs", type=int, default=None, help="epochs (default: about a minute)")
    demo.add_argument("--url", default=None, help="server URL (default: TRAINWIRE_URL or local)")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            from trainwire.server.runner import serve as run_server

            settings = Settings(
                host=args.host,
                port=args.port,
                data_dir=args.data,
                heartbeat_timeout=args.heartbeat_timeout,
            )
            run_server(settings, port_fallback=args.port_fallback, ready_fd=args.ready_fd)
            return 0
        if args.command == "stop":
            from trainwire.server.runner import stop as stop_server

            url = stop_server(args.data)
            print(
                f"stopped the trainwire server at {url}" if url else "no trainwire server running"
            )
            return 0
        if args.command == "sync":
            return _sync(args.path, args.url, args.timeout, env)
        if args.command == "demo":
            from trainwire.demo import run_demo

            return run_demo(epochs=args.epochs, url=args.url)
    except TrainwireError as exc:
        print(f"trainwire: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2  # parser.error exits; mypy does not know that


def _sync(path: Path, url: str | None, timeout: float, env: Settings) -> int:
    import os

    from trainwire.client.local import ensure_local_server
    from trainwire.client.sync import run_files, upload

    files = run_files(path)
    if not files:
        print(f"trainwire: no run files under {path}", file=sys.stderr)
        return 1
    server = url or os.environ.get("TRAINWIRE_URL") or ensure_local_server(env.data_dir, env.port)
    failed = 0
    for file in files:
        run_id, rows, complete = upload(file, server, timeout)
        print(f"{file}: run {run_id}, {rows} rows: {'stored' if complete else 'NOT confirmed'}")
        failed += not complete
    return 1 if failed else 0
