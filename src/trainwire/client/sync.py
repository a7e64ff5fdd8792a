"""``trainwire sync``: upload run files written offline, or left by a run whose
server stayed unreachable. Idempotent: the files carry their stream and sequence
numbers, and the server stores each batch once however often it is sent."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import NamedTuple

from trainwire.client.run import _ingest_url
from trainwire.client.sender import Sender
from trainwire.client.spool import SpillingOutbox
from trainwire.protocol.session import ClientSession

__all__ = ["Uploaded", "run_files", "upload"]

logger = logging.getLogger("trainwire.client")


def run_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``*.twrun`` file under the folder ``path``."""
    return sorted(path.rglob("*.twrun")) if path.is_dir() else [path]


class Uploaded(NamedTuple):
    """What :func:`upload` did with one run file."""

    run_id: str
    rows: int  # rows in the file
    complete: bool  # the server confirmed everything within the timeout
    refused_values: int  # values not stored: the run has the most keys it allows


def upload(
    path: Path, server_url: str, timeout: float = 60.0, token: str | None = None
) -> Uploaded:
    """Send one run file to a server and wait for every item to be acknowledged.

    Raises:
        ConfigError: the file is not a run file, or the URL is not http(s).
    """
    outbox = SpillingOutbox.open_existing(path)
    header = outbox.header
    rows = outbox.rows
    session = ClientSession(
        header.run,
        stream=header.stream,
        rank=header.rank,
        outbox=outbox,
        next_seq=(outbox.last_seq or 0) + 1,
        replay=True,
    )
    sender = Sender(session, deque(), _ingest_url(server_url), token=token)
    sender.start()
    sender.close(None, timeout)
    sender.join(timeout + 1.0)
    return Uploaded(header.run.id, rows, sender.complete, session.refused_values)
