"""What a server takes, by default: metric keys, steps, and how deep a config nests.

The server checks every new key of a connection (``ServerSession``) and refuses a
batch holding a bad one by closing the connection; the client checks the same rules
before it sends (``Sender``), because a refused batch is sent again after every
reconnect: one bad key would hold back every row logged after it, and `trainwire
sync` would meet the same refusal. A server configured with tighter limits than
these still refuses; its close reason says which. ``init()`` checks a config's depth
for the same reason: a refused hello would refuse the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = [
    "BATCH_VALUES",
    "MAX_CONFIG_DEPTH",
    "MAX_FRAME_BYTES",
    "MAX_KEYS_PER_RUN",
    "MAX_KEY_LENGTH",
    "MAX_ROWS_PER_BATCH",
    "STEP_MAX",
    "STEP_MIN",
    "key_name_problem",
    "key_problem",
    "nests_deeper_than",
    "run_id_problem",
]

MAX_KEY_LENGTH: Final = 200
MAX_KEYS_PER_RUN: Final = 10_000
# Rows (steps) in one batch; the client cuts its batches at a tenth of this.
MAX_ROWS_PER_BATCH: Final = 10_000
# SQLite integers are signed 64-bit.
STEP_MIN: Final = -(2**63)
STEP_MAX: Final = 2**63 - 1
# The largest frame a server takes from a trainer (it closes the connection, 1009).
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
# The most values a client puts in one batch: at most about 212 bytes each (a key of
# MAX_KEY_LENGTH characters, its header, a float), so a batch stays under 4 MiB,
# well within MAX_FRAME_BYTES, whatever its keys. Rows are cut by count too, so most
# loops (a few keys a row) never reach it; a row of 10,000 long keys (2.1 MB) still
# goes whole, alone.
BATCH_VALUES: Final = 16_384
# How deep a hello's config or env may nest maps and arrays. They are stored, then
# encoded again for every run list and run page, each time deeper in the server's
# stack than where they were decoded: a config just within the decoder's reach broke
# those pages for everyone, for good. Real configs nest a few levels; 32 leaves them
# room, and any stack far more.
MAX_CONFIG_DEPTH: Final = 32
# A run id names a directory of the client's run files: a file system's name limit.
MAX_RUN_ID_BYTES: Final = 255


def key_problem(
    key: str,
    known: int,
    *,
    max_length: int = MAX_KEY_LENGTH,
    max_keys: int = MAX_KEYS_PER_RUN,
) -> str | None:
    """Why a server refuses ``key`` as a new metric key of a run that already has
    ``known`` keys; None if it takes it."""
    problem = key_name_problem(key, max_length)
    if problem is None and known >= max_keys:
        return f"run has more than {max_keys} metric keys"
    return problem


def key_name_problem(key: str, max_length: int = MAX_KEY_LENGTH) -> str | None:
    """Why ``key`` is no metric key at all (a server closes the connection of a
    writer that sends it); None if it is one."""
    if not key or len(key) > max_length:
        return f"metric keys must have 1 to {max_length} characters"
    if not key.isprintable():
        return f"metric key {key[:40]!r} has control characters"
    return None


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` cannot name a run; None if it can. Every such id was taken,
    and then its run lost: a separator made the run unreachable from the dashboard
    and the REST API (``/api/runs/{run_id}`` is one path segment) and put its file
    elsewhere (``..``), and a name too long for the file system lost the run file."""
    if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        # Cut as below: a dashboard is sent the reason, and an id may be megabytes.
        return f"run id {run_id[:40]!r} must be a name, without / or \\"
    if not run_id.isprintable():
        return f"run id {run_id[:40]!r} has control characters"
    if len(run_id.encode()) > MAX_RUN_ID_BYTES:
        return f"run id {run_id[:40]!r}... is longer than {MAX_RUN_ID_BYTES} bytes"
    return None


def nests_deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests maps and arrays more than ``limit`` deep (itself, if
    one, counting as the first level). A loop, not a recursion: it is given values
    too deep for Python's own recursion limit."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
