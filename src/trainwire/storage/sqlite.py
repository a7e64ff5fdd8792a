"""SQLite storage: one file, WAL mode, schema versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, Row, RunInfo, RunSpec, RunStatus, Series
from trainwire.settings import make_private_dir
from trainwire.storage import chunks
from trainwire.storage.base import (
    Commit,
    CommittedColumns,
    RunDeleted,
    SampledSeries,
    SeriesSummary,
)
from trainwire.storage.chunks import Chunk, Columns
from trainwire.storage.downsample import downsample

__all__ = ["MERGE_AT", "SCHEMA_VERSION", "SMALL_CHUNK", "SQLiteStore"]

logger = logging.getLogger("trainwire.server")

SCHEMA_VERSION: Final = 4

# Compaction. A live trainer commits a row or two per key every 20 ms, one chunk each:
# a million points would be half a million rows. So when a series ends with MERGE_AT
# chunks of fewer than SMALL_CHUNK points, they are merged into one, in the transaction
# that added the last; a merged chunk still small is merged again with the next ones
# until it holds SMALL_CHUNK points. Bounded both ways. Rows: one per SMALL_CHUNK
# points, plus at most MERGE_AT - 1 small ones at the end (and as many before each
# large chunk, which ends a run of small ones). Work: a point is rewritten until its
# chunk is large; for 2-row batches that is on average SMALL_CHUNK / (2 * (MERGE_AT -
# 1)) = 66 points rewritten per commit and key, for 1000-row batches one rewrite of
# each point (about a tenth of ingest time, for 32 times fewer rows).
SMALL_CHUNK: Final = 4096
MERGE_AT: Final = 32

# Each entry upgrades the schema from version i to i + 1: SQL, or a function of the
# connection for a step SQL alone cannot do. Each runs in one transaction.
_MIGRATIONS: Final[list[str | Callable[[sqlite3.Connection], None]]] = [
    """
    -- commit_seq counts committed batches of the run, whatever stream they came
    -- from: dashboards resume from it.
    CREATE TABLE runs (
        id         TEXT PRIMARY KEY,
        project    TEXT NOT NULL,
        name       TEXT NOT NULL,
        status     TEXT NOT NULL,
        created    REAL NOT NULL,
        updated    REAL NOT NULL,
        config     TEXT NOT NULL,
        commit_seq INTEGER NOT NULL DEFAULT 0
    );
    -- One writer's sequence of batches (a process; a DDP rank): last_seq
    -- de-duplicates what it resends.
    CREATE TABLE streams (
        run_id   TEXT NOT NULL REFERENCES runs(id),
        stream   TEXT NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        status   TEXT NOT NULL,
        PRIMARY KEY (run_id, stream)
    );
    CREATE TABLE series (
        id     INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(id),
        key    TEXT NOT NULL,
        UNIQUE (run_id, key)
    );
    -- SQLite stores NaN as NULL; a value is otherwise never NULL, so NULL reads back as NaN.
    CREATE TABLE points (
        series_id INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        step      INTEGER NOT NULL,
        time      REAL NOT NULL,
        value     REAL
    );
    CREATE INDEX points_by_series_seq ON points (series_id, seq);
    """,
    """
    -- Share tokens made by `trainwire token create`; only their SHA-256 is kept.
    CREATE TABLE tokens (
        id      TEXT PRIMARY KEY,
        hash    TEXT NOT NULL UNIQUE,
        scope   TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL,
        revoked INTEGER NOT NULL DEFAULT 0,
        note    TEXT NOT NULL DEFAULT ''
    );
    """,
    # 3: points move into chunks (see trainwire.storage.chunks); runs get env.
    lambda db: _chunk_points(db),  # defined below
    """
    -- 4: the writer's rank (NULL: none, or a stream older than this column): a run
    -- file uploaded late is told from another rank's by it (see open_run).
    ALTER TABLE streams ADD COLUMN rank INTEGER;
    -- The run list, newest first, read in order: without it, every listing copied
    -- every run, configs and all (25 MB for 5,000 runs), into a sorter first.
    CREATE INDEX runs_by_created ON runs (created);
    """,
]

# A run is deleted in two steps (delete_run): at once, its series are detached, their
# run_id made this prefix and their own id (no run id holds a "/"); then their chunks
# are deleted DELETE_SLICE at a time, the store's lock free between slices. In one
# transaction, deleting a 12,000,000-point run held every read and commit for 4 s
# (Debian's SQLite zeroes every freed page: 290 MB written to the WAL).
_DETACHED: Final = "/deleted/"
_DETACHED_END: Final = "/deleted0"  # "0" follows "/": the end of the prefix's range
DELETE_SLICE: Final = 64

# What every database of SCHEMA_VERSION holds, checked at open.
_TABLES: Final = frozenset({"runs", "streams", "series", "chunks", "tokens"})

_CHUNK_COLUMNS: Final = "seq_lo, seq_hi, n, step_lo, step_hi, vmin, vmax, steps, times, vals, seqs"
_INSERT_CHUNK: Final = f"INSERT INTO chunks (series_id, {_CHUNK_COLUMNS}) VALUES ({'?, ' * 11}?)"
_RUN_COLUMNS: Final = "id, project, name, status, created, updated, config, env"
# A stream's status when the server decided its writer vanished (mark_crashed): the
# run reads as crashed, and the writer's return undoes it. A stream the writer itself
# ended with `finish` status "crashed" is "crashed", an end like "finished".
_LOST: Final = "lost"
# A stream whose writer's process a resumed run replaced (set_aside): counts for
# nothing in the run's status.
_SET_ASIDE: Final = "set aside"


class SQLiteStore:
    """A :class:`~trainwire.storage.base.Store` in one SQLite file.

    Args:
        path: the database file; its folder is created if missing.

    Raises:
        StorageError: the file cannot be opened, or was written by a newer trainwire.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            # Private (0700): it holds every run; the README promises as much.
            make_private_dir(self.path.parent)
            # And the file itself (0600; SQLite gives its -wal and -shm the same
            # mode): in a folder the user made, or one a client made 0755 before it
            # kept them private, SQLite's 0644 let every user read every run.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror}") from exc
        # One connection, used from the server's thread pool under a lock: SQLite
        # serialises writers anyway, and reads under the same lock see a batch and its
        # run's commit_seq together, which the dashboards' no-gap resume relies on.
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of the server process; only
            # a power loss may roll back the last transactions.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        # Run id -> key -> series id, for the runs written to while running: a run
        # that ends is forgotten (see _settle_status), or a server up for months held
        # every key ever written (300 bytes each: 120 MB for a sweep of 1,000 runs of
        # 400 keys). Looked up again in the table if the run is written to later.
        self._series_ids: dict[str, dict[str, int]] = {}
        # Per series id: how many small chunks end it (see MERGE_AT), once known.
        self._small_tails: dict[int, int] = {}
        try:
            self.purge_deleted()  # what a delete cut short (a crash, a stop) left
        except StorageError as exc:
            # Not a reason to refuse to start: the points are out of every reader's
            # way already, and go at the next delete or start. (The likeliest cause,
            # a full disk, is also when runs are deleted: freeing pages writes them
            # to the WAL first.)
            logger.warning("%s: points of deleted runs left for later (%s)", self.path, exc)

    def _migrate(self) -> None:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path} has schema version {version}; this trainwire knows up to "
                f"{SCHEMA_VERSION}: upgrade trainwire"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # One transaction per step: a crash mid-migration leaves the old version.
            step = _MIGRATIONS[target - 1]
            if isinstance(step, str):
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {step} PRAGMA user_version = {target}; COMMIT;"
                )
                continue
            self._db.execute("BEGIN IMMEDIATE")
            try:
                step(self._db)
                self._db.execute(f"PRAGMA user_version = {target}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        # A file that claims the current version but lacks a table (written by a
        # development build between releases) would fail every batch later, one
        # traceback per trainer: refuse it now, once, saying what is wrong.
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        missing = sorted(_TABLES - tables)
        if missing:
            raise StorageError(
                f"{self.path} says schema version {SCHEMA_VERSION} but lacks the table(s)"
                f" {', '.join(missing)}: it was not written by a released trainwire;"
                " move it aside to start afresh"
            )

    # -- writes ---------------------------------------------------------------------

    def open_run(
        self,
        spec: RunSpec,
        stream: str,
        now: float,
        *,
        rank: int | None = None,
        replay: bool = False,
    ) -> int:
        with self._lock, self._transaction():
            exists = self._db.execute("SELECT 1 FROM runs WHERE id = ?", (spec.id,)).fetchone()
            if exists is None:
                # A resumed run keeps the environment it was started in.
                self._db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        spec.id,
                        spec.project,
                        spec.name,
                        RunStatus.RUNNING,
                        now,
                        now,
                        msgspec.json.encode(spec.config, enc_hook=str).decode(),
                        msgspec.json.encode(spec.env, enc_hook=str).decode(),
                    ),
                )
            row = self._db.execute(
                "SELECT last_seq FROM streams WHERE run_id = ? AND stream = ?", (spec.id, stream)
            ).fetchone()
            if row is None:
                # A file uploaded into a run where another writer has taken its rank
                # since (a resumed attempt, a torchrun restart): its writer is the one
                # replaced. Running, it turned a run that the resumed attempt had
                # finished running, then crashed. A file of a rank nobody else wrote
                # (a rank of an offline job, its files synced one by one) is that
                # rank's whole story: it goes as its end, or the heartbeat, says, as
                # the run's other ranks do. (A stream older than the rank column has
                # none: taken as rank None's.)
                late = (
                    replay
                    and exists is not None
                    and self._db.execute(
                        "SELECT 1 FROM streams WHERE run_id = ? AND rank IS ? LIMIT 1",
                        (spec.id, rank),
                    ).fetchone()
                    is not None
                )
                self._db.execute(
                    "INSERT INTO streams (run_id, stream, last_seq, status, rank)"
                    " VALUES (?, ?, 0, ?, ?)",
                    (spec.id, stream, _SET_ASIDE if late else RunStatus.RUNNING, rank),
                )
            elif not replay:
                # A writer back after the server declared it vanished. A stream its
                # writer ended (finished, or crashed by its own finish) stays ended:
                # this is a resend of what it already has.
                self._db.execute(
                    "UPDATE streams SET status = ? WHERE run_id = ? AND stream = ? AND status = ?",
                    (RunStatus.RUNNING, spec.id, stream, _LOST),
                )
            self._settle_status(spec.id, now)
            return 0 if row is None else int(row[0])

    def append_batch(
        self,
        run_id: str,
        stream: str,
        batch: Batch,
        now: float,
        prefix: str = "",
        max_keys: int | None = None,
    ) -> Commit | None:
        # The key limit is checked here, under the lock, where every writer of the
        # run meets: no number of connections or ranks gets around it.
        with self._lock, self._transaction():
            if not self._claim_seq(run_id, stream, batch.seq):
                return None
            prev, commit = self._next_commit(run_id, now)
            # One chunk per key: a single row however many points the batch holds.
            encoded: list[tuple[int, Chunk]] = []
            refused: list[str] = []
            # The run's keys, counted once per batch (at its first new key), not once
            # per new key: under the lock, that made a batch of many keys past the
            # limit cost seconds, and a run's first batch quadratic in its keys.
            count: int | None = None
            for key, columns in _columns(batch.rows).items():
                series_id = self._series_id(run_id, prefix + key)
                if series_id is None:
                    if max_keys is not None:
                        if count is None:
                            count = self._key_count(run_id)
                        if count >= max_keys:
                            refused.append(key)
                            continue
                        count += 1
                    series_id = self._new_series(run_id, prefix + key)
                encoded.append((series_id, chunks.encode(commit, *columns)))
            self._db.executemany(_INSERT_CHUNK, [(sid, *chunk) for sid, chunk in encoded])
            for series_id, chunk in encoded:
                self._compact(series_id, chunk.n)
            return Commit(prev_seq=prev, seq=commit, refused=tuple(refused))

    def set_status(
        self, run_id: str, stream: str, status: str, seq: int, now: float
    ) -> RunInfo | None:
        with self._lock, self._transaction():
            if not self._claim_seq(run_id, stream, seq):
                return None
            # A stream set aside stays so: its end (a late upload's "crashed", or
            # that of a writer a resume took for gone) is no longer the run's.
            self._db.execute(
                "UPDATE streams SET status = ? WHERE run_id = ? AND stream = ? AND status != ?",
                (status, run_id, stream, _SET_ASIDE),
            )
            return self._settle_status(run_id, now)

    def set_aside(self, run_id: str, keep: Collection[str], now: float) -> RunInfo | None:
        with self._lock, self._transaction():
            marks = ", ".join("?" * len(keep))
            # Crashed too: the attempt the resumed script replaces ended so itself (an
            # exception, an out-of-memory error); left in, it held the run crashed
            # however the resumed script ended.
            self._db.execute(
                "UPDATE streams SET status = ? WHERE run_id = ? AND status IN (?, ?, ?)"
                f" AND stream NOT IN ({marks})",
                (_SET_ASIDE, run_id, RunStatus.RUNNING, _LOST, RunStatus.CRASHED, *keep),
            )
            return self._settle_status(run_id, now)

    def mark_crashed(self, run_id: str, now: float) -> RunInfo | None:
        return self._move_streams(run_id, RunStatus.RUNNING, _LOST, now)

    def revive(self, run_id: str, now: float) -> RunInfo | None:
        return self._move_streams(run_id, _LOST, RunStatus.RUNNING, now)

    def _move_streams(self, run_id: str, before: str, after: str, now: float) -> RunInfo | None:
        """Every stream of the run in status ``before`` goes to ``after``; the run's
        own status follows."""
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE streams SET status = ? WHERE run_id = ? AND status = ?",
                (after, run_id, before),
            )
            return self._settle_status(run_id, now)

    def delete_run(self, run_id: str) -> bool:
        deleted = self.detach_run(run_id)
        self.purge_deleted()
        return deleted

    def detach_run(self, run_id: str) -> bool:
        with self._lock, self._transaction():
            # Detached, not deleted, in this transaction (see _DETACHED): gone at once
            # for every reader, and a trainer writing to the same id meanwhile opens
            # the run anew with series of its own, never these.
            self._db.execute(
                "UPDATE series SET run_id = ? || id WHERE run_id = ?", (_DETACHED, run_id)
            )
            self._db.execute("DELETE FROM streams WHERE run_id = ?", (run_id,))
            deleted = self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0
            # Under the lock: a writer in between could otherwise still find a deleted
            # series id here.
            self._series_ids.pop(run_id, None)
        return deleted

    def purge_deleted(self) -> None:
        """Delete the chunks of detached series, DELETE_SLICE per transaction, then
        each series; the lock is taken anew for every slice."""
        while True:
            with self._lock, self._transaction():
                row = self._db.execute(
                    "SELECT id FROM series WHERE run_id >= ? AND run_id < ? LIMIT 1",
                    (_DETACHED, _DETACHED_END),
                ).fetchone()
                if row is None:
                    return
                series_id: int = row[0]
                gone = self._db.execute(
                    "DELETE FROM chunks WHERE rowid IN"
                    " (SELECT rowid FROM chunks WHERE series_id = ? LIMIT ?)",
                    (series_id, DELETE_SLICE),
                ).rowcount
                if gone < DELETE_SLICE:  # its last chunks: the series goes too
                    self._db.execute("DELETE FROM series WHERE id = ?", (series_id,))
                    # SQLite may hand the id out again from now on: a tail counted
                    # for it would be another series'.
                    self._small_tails.pop(series_id, None)

    def running_runs(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM runs WHERE status = ?", (RunStatus.RUNNING,)
            ).fetchall()
        return [run_id for (run_id,) in rows]

    def _settle_status(self, run_id: str, now: float) -> RunInfo | None:
        # A run is running while any of its writers is; else crashed if one crashed.
        statuses = {
            status
            for (status,) in self._db.execute(
                "SELECT status FROM streams WHERE run_id = ?", (run_id,)
            ).fetchall()
        }
        for status in (RunStatus.RUNNING, RunStatus.CRASHED, RunStatus.FINISHED):
            if status in statuses or (status == RunStatus.CRASHED and _LOST in statuses):
                break
        else:
            return self._run(run_id)
        if status != RunStatus.RUNNING:
            # Ended: its writers are gone, and what this store keeps of it with them.
            for series_id in self._series_ids.pop(run_id, {}).values():
                self._small_tails.pop(series_id, None)
        self._db.execute(
            "UPDATE runs SET status = ?, updated = ? WHERE id = ?", (status, now, run_id)
        )
        return self._run(run_id)

    def _claim_seq(self, run_id: str, stream: str, seq: int) -> bool:
        """Move the stream's last_seq to ``seq``; False if it already holds it."""
        row = self._db.execute(
            "SELECT last_seq FROM streams WHERE run_id = ? AND stream = ?", (run_id, stream)
        ).fetchone()
        if row is None:
            # open_run made it: only delete_run takes it away.
            raise RunDeleted(f"no stream {stream!r} in run {run_id!r}")
        if seq <= row[0]:
            return False
        self._db.execute(
            "UPDATE streams SET last_seq = ? WHERE run_id = ? AND stream = ?",
            (seq, run_id, stream),
        )
        return True

    def _next_commit(self, run_id: str, now: float) -> tuple[int, int]:
        (prev,) = self._db.execute("SELECT commit_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
        self._db.execute(
            "UPDATE runs SET commit_seq = ?, updated = ? WHERE id = ?", (prev + 1, now, run_id)
        )
        return int(prev), int(prev) + 1

    def _series_id(self, run_id: str, key: str) -> int | None:
        """The series of ``key``; None if the run has none yet."""
        known = self._series_ids.setdefault(run_id, {})
        cached = known.get(key)
        if cached is not None:
            return cached
        row = self._db.execute(
            "SELECT id FROM series WHERE run_id = ? AND key = ?", (run_id, key)
        ).fetchone()
        if row is None:
            return None
        series_id: int = row[0]
        known[key] = series_id
        return series_id

    def _new_series(self, run_id: str, key: str) -> int:
        """Make the series of a new ``key``."""
        (series_id,) = self._db.execute(
            "INSERT INTO series (run_id, key) VALUES (?, ?) RETURNING id", (run_id, key)
        ).fetchone()
        self._series_ids.setdefault(run_id, {})[key] = series_id
        return int(series_id)

    def _key_count(self, run_id: str) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM series WHERE run_id = ?", (run_id,)
        ).fetchone()
        return int(count)

    def _compact(self, series_id: int, added: int) -> None:
        """A chunk of ``added`` points was just appended to the series: merge its
        small chunks at the end once there are MERGE_AT of them."""
        tail = self._small_tails.get(series_id)
        if tail is None:  # first append to this series since the store opened
            sizes = self._db.execute(
                "SELECT n FROM chunks WHERE series_id = ? ORDER BY seq_hi DESC LIMIT ?",
                (series_id, MERGE_AT),
            ).fetchall()
            tail = sum(1 for _ in itertools.takewhile(lambda row: row[0] < SMALL_CHUNK, sizes))
        else:
            tail = tail + 1 if added < SMALL_CHUNK else 0
        if tail >= MERGE_AT:
            small = self._small_tail(series_id)[::-1]  # in commit order
            merged = chunks.merge(small)
            self._db.execute(
                "DELETE FROM chunks WHERE series_id = ? AND seq_hi >= ?",
                (series_id, small[0].seq_hi),
            )
            self._db.execute(_INSERT_CHUNK, (series_id, *merged))
            tail = 1 if merged.n < SMALL_CHUNK else 0
        self._small_tails[series_id] = tail

    def _small_tail(self, series_id: int) -> list[Chunk]:
        """The small chunks that end the series (up to MERGE_AT), newest first."""
        newest = [
            Chunk(*row)
            for row in self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE series_id = ?"
                " ORDER BY seq_hi DESC LIMIT ?",
                (series_id, MERGE_AT),
            )
        ]
        return list(itertools.takewhile(lambda chunk: chunk.n < SMALL_CHUNK, newest))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, on_rollback=self._forget_caches)

    def _forget_caches(self) -> None:
        # On rollback: cached series ids may name rows that were undone, and tails
        # count chunks that were.
        self._series_ids.clear()
        self._small_tails.clear()

    # -- reads ----------------------------------------------------------------------

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created DESC"
            ).fetchall()
        return [_run_info(row) for row in rows]

    def runs_json(self) -> bytes:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created DESC"
            ).fetchall()
        return msgspec.json.encode([_listed_run(row) for row in rows])

    def get_run(self, run_id: str) -> RunInfo | None:
        with self._lock:
            return self._run(run_id)

    def _run(self, run_id: str) -> RunInfo | None:
        row = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        return None if row is None else _run_info(row)

    def keys(self, run_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM series WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [key for (key,) in rows]

    def metrics(
        self, run_id: str, keys: list[str] | None = None, after: int = 0
    ) -> tuple[int, dict[str, Series]]:
        # Chunks are keyed by their last commit: those ending after `after` hold every
        # point committed after it (a merged one, some points before it too).
        with self._lock, self._transaction():
            last_seq = self._commit_seq(run_id)
            found, rows = self._read_chunks(run_id, keys, " AND seq_hi > ?", [after])
        # Decoded outside the lock: ingest need not wait for it.
        series: dict[str, Series] = {}
        for key, parts in _group(found, rows).items():
            steps, times, values = _concatenate([chunks.decode_after(c, after) for c in parts])
            if len(steps):
                series[key] = Series(steps.tolist(), times.tolist(), values.tolist())
        return last_seq, series

    def columns_after(self, run_id: str, after: int) -> tuple[int, dict[str, CommittedColumns]]:
        with self._lock, self._transaction():
            last_seq = self._commit_seq(run_id)
            found, rows = self._read_chunks(run_id, None, " AND seq_hi > ?", [after])
        out: dict[str, CommittedColumns] = {}
        for key, parts in _group(found, rows).items():
            steps, times, values = _concatenate([chunks.decode_after(c, after) for c in parts])
            if len(steps):
                commits = np.concatenate([chunks.commits_after(c, after) for c in parts])
                out[key] = CommittedColumns(steps, times, values, commits)
        return last_seq, out

    def history(
        self,
        run_id: str,
        keys: list[str] | None = None,
        start: int | None = None,
        end: int | None = None,
        points: int | None = None,
    ) -> tuple[int, dict[str, SampledSeries]]:
        # Only the chunks whose step range meets [start, end]: their blobs alone are read.
        overlap = ""
        if start is not None:
            overlap += " AND step_hi >= ?"
        if end is not None:
            overlap += " AND step_lo <= ?"
        bounds = [bound for bound in (start, end) if bound is not None]
        with self._lock, self._transaction():
            run = self._db.execute(
                "SELECT commit_seq, created FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            found = self._db.execute(*_series_query(run_id, keys)).fetchall()
        if run is None:
            return 0, {}
        last_seq, created = int(run[0]), float(run[1])
        # One series at a time, each downsampled before the next is read: read at
        # once, a 4-key run of 3,000,000 steps held 288 MB of blobs, and the lock for
        # all of them; a 400-key one, its every point, to chart 2,000 per key. The
        # lock is free between series: points committed meanwhile are left out, as
        # of last_seq, for the dashboard that subscribes after it.
        return last_seq, {
            key: _sampled(
                self._series_as_of(run_id, series_id, key, created, last_seq, overlap, bounds),
                start,
                end,
                points,
            )
            for series_id, key in found
        }

    def _series_as_of(
        self,
        run_id: str,
        series_id: int,
        key: str,
        created: float,
        last_seq: int,
        condition: str,
        params: list[Any],
    ) -> Columns:
        """The points of a series of the run committed up to ``last_seq``, of the
        chunks that meet ``condition``, in commit order; none if the series is no
        longer the run's ``key``, or the run is no longer the one made at ``created``.

        Between series the run may be deleted and its series ids handed out again:
        to another run, or to the same run id made anew by its writer (which numbers
        its commits from 1 again, under last_seq). Checked on the id and run id
        alone, the answer held the new run's points, under another key's name."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE series_id = ("
                "  SELECT s.id FROM series s JOIN runs r ON r.id = s.run_id"
                "  WHERE s.id = ? AND s.run_id = ? AND s.key = ? AND r.created = ?"
                f") AND seq_lo <= ?{condition} ORDER BY seq_hi",
                [series_id, run_id, key, created, last_seq, *params],
            ).fetchall()
        return _concatenate([chunks.decode_through(Chunk(*row), last_seq) for row in rows])

    def _read_chunks(
        self, run_id: str, keys: list[str] | None, condition: str, params: list[Any]
    ) -> tuple[list[tuple[int, str]], list[tuple[Any, ...]]]:
        """The run's series ``(id, key)`` (those of ``keys``), and the rows of their
        chunks that meet ``condition``, ``(series_id, *chunk)``, in series and commit
        order."""
        found = self._db.execute(*_series_query(run_id, keys)).fetchall()
        which, wanted = _series_condition(run_id, keys)
        # IN (subquery), not a join: the primary key then yields chunks already in
        # order, where a join's ORDER BY would copy every blob into a sorter.
        rows = self._db.execute(
            f"SELECT series_id, {_CHUNK_COLUMNS} FROM chunks"
            f" WHERE series_id IN (SELECT id FROM series WHERE {which}){condition}"
            " ORDER BY series_id, seq_hi",
            [*wanted, *params],
        ).fetchall()
        return found, rows

    def summary(self, run_id: str) -> dict[str, SeriesSummary]:
        # Counts and extremes come from the chunks' own columns; the last point logged
        # is the last of the newest chunk: the last 8 bytes of its blobs.
        query = """
            SELECT s.key, SUM(c.n), MIN(c.vmin), MAX(c.vmax),
                (SELECT substr(l.steps, -8) FROM chunks l WHERE l.series_id = s.id
                 ORDER BY l.seq_hi DESC LIMIT 1),
                (SELECT substr(l.vals, -8) FROM chunks l WHERE l.series_id = s.id
                 ORDER BY l.seq_hi DESC LIMIT 1)
            FROM series s JOIN chunks c ON c.series_id = s.id
            WHERE s.run_id = ? GROUP BY s.id ORDER BY s.id
        """
        with self._lock:
            rows = self._db.execute(query, (run_id,)).fetchall()
        return {
            key: SeriesSummary(
                count=count,
                last=_LAST_VALUE.unpack(last)[0],
                last_step=_LAST_STEP.unpack(last_step)[0],
                min=vmin,
                max=vmax,
            )
            for key, count, vmin, vmax, last_step, last in rows
        }

    def _commit_seq(self, run_id: str) -> int:
        row = self._db.execute("SELECT commit_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def integrity_check(self) -> str:
        """SQLite's own consistency check: ``"ok"`` when the file is sound."""
        with self._lock:
            result: str = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        return result

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error, sqlite3 errors translated."""

    def __init__(self, db: sqlite3.Connection, on_rollback: Callable[[], None]) -> None:
        self._db = db
        self._on_rollback = on_rollback

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                self._db.execute("ROLLBACK")
                self._on_rollback()
                raise StorageError(str(commit_error)) from commit_error
        self._db.execute("ROLLBACK")
        self._on_rollback()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(str(exc)) from exc


def _run_info(row: tuple[Any, ...]) -> RunInfo:
    run_id, project, name, status, created, updated, config, env = row
    return RunInfo(
        id=run_id,
        project=project,
        name=name,
        status=status,
        created=created,
        updated=updated,
        config=json.loads(config),
        env=json.loads(env),
    )


class _ListedRun(msgspec.Struct, frozen=True):
    """A :class:`RunInfo` whose config and env are the JSON text stored: encoded as
    the RunInfo would be, without decoding them first."""

    id: str
    project: str
    name: str
    status: str
    created: float
    updated: float
    config: msgspec.Raw
    env: msgspec.Raw


# Checks JSON text and wraps it, building nothing: 25 MB in 0.04 s.
_raw_json: Final = msgspec.json.Decoder(msgspec.Raw)


def _listed_run(row: tuple[Any, ...]) -> _ListedRun | RunInfo:
    run_id, project, name, status, created, updated, config, env = row
    try:
        config_json, env_json = _raw_json.decode(config), _raw_json.decode(env)
    except msgspec.DecodeError:
        # Not strict JSON: a config stored by an early development build (NaN, as
        # json.dumps spelled it). Decoded leniently and encoded afresh, as list_runs.
        return _run_info(row)
    return _ListedRun(run_id, project, name, status, created, updated, config_json, env_json)


_LAST_STEP: Final = struct.Struct("<q")
_LAST_VALUE: Final = struct.Struct("<d")


def _columns(rows: Iterable[Row]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Regroup ``(step, time, {key: value})`` rows into columns per key."""
    columns: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for step, time, values in rows:
        for key, value in values.items():
            column = columns.get(key)
            if column is None:
                column = columns[key] = ([], [], [])
            column[0].append(step)
            column[1].append(time)
            column[2].append(value)
    return columns


def _series_condition(run_id: str, keys: list[str] | None) -> tuple[str, list[Any]]:
    """The WHERE clause and parameters of the run's series (those of ``keys``)."""
    if keys is None:
        return "run_id = ?", [run_id]
    return f"run_id = ? AND key IN ({', '.join('?' * len(keys))})", [run_id, *keys]


def _series_query(run_id: str, keys: list[str] | None) -> tuple[str, list[Any]]:
    """The run's series ``(id, key)`` (those of ``keys``), in order of creation."""
    which, wanted = _series_condition(run_id, keys)
    return f"SELECT id, key FROM series WHERE {which} ORDER BY id", wanted


def _group(found: list[tuple[int, str]], rows: list[tuple[Any, ...]]) -> dict[str, list[Chunk]]:
    """Chunk rows per key, every series found included, in series order."""
    by_id: dict[int, list[Chunk]] = {series_id: [] for series_id, _ in found}
    for series_id, *chunk in rows:
        by_id[series_id].append(Chunk(*chunk))
    return {key: by_id[series_id] for series_id, key in found}


def _concatenate(parts: list[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Columns(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64))
    return Columns(
        np.concatenate([p.steps for p in parts]),
        np.concatenate([p.times for p in parts]),
        np.concatenate([p.values for p in parts]),
    )


def _sampled(
    columns: Columns, start: int | None, end: int | None, points: int | None
) -> SampledSeries:
    """Columns in logging order -> the series of ``[start, end]`` sorted by step,
    downsampled to ``points``."""
    steps, times, values = columns
    if len(steps) and (start is not None or end is not None):
        # Chunks overlapping the range may hold points outside it.
        lo = steps.min() if start is None else start
        hi = steps.max() if end is None else end
        inside = (steps >= lo) & (steps <= hi)
        if not inside.all():
            steps, times, values = steps[inside], times[inside], values[inside]
    # Compared, not subtracted: np.diff wraps around for steps more than 2**63 - 1 apart.
    if (steps[1:] < steps[:-1]).any():
        # Logged out of order (a resumed run, an uploaded file): stable, so points of
        # the same step stay in logging order.
        order = np.argsort(steps, kind="stable")
        steps, times, values = steps[order], times[order], values[order]
    sampled = False
    if points is not None and len(steps) > points:
        lo = int(steps[0]) if start is None else start
        hi = int(steps[-1]) if end is None else end
        steps, times, values, sampled = downsample(
            steps, times, values, points=points, start=lo, end=hi
        )
    return SampledSeries(steps.tolist(), times.tolist(), values.tolist(), sampled)


def _chunk_points(db: sqlite3.Connection) -> None:
    """Migration 3: from one row per point to chunks; ``runs.env``.

    Each series' commits are packed in order into chunks of at least SMALL_CHUNK
    points (the last may be smaller), as compaction would have left them.
    """
    db.execute(
        """
        CREATE TABLE chunks (
            series_id INTEGER NOT NULL,
            seq_lo    INTEGER NOT NULL,
            seq_hi    INTEGER NOT NULL,
            n         INTEGER NOT NULL,
            step_lo   INTEGER NOT NULL,
            step_hi   INTEGER NOT NULL,
            vmin      REAL,
            vmax      REAL,
            steps     BLOB NOT NULL,
            times     BLOB NOT NULL,
            vals      BLOB NOT NULL,
            seqs      BLOB
        )
        """
    )
    # Not WITHOUT ROWID, keyed by (series_id, seq_hi): interior pages of such a table
    # hold whole rows, so every seek read each blob it passed (15 ms to find one
    # series' 39 chunks). A rowid table keeps the blobs at its leaves, found through
    # this small index.
    db.execute("CREATE UNIQUE INDEX chunks_by_series ON chunks (series_id, seq_hi)")
    db.execute("ALTER TABLE runs ADD COLUMN env TEXT NOT NULL DEFAULT '{}'")
    # The commits of each series, streamed: only one chunk's points are in memory at
    # a time, however large the file.
    commits = db.execute(
        "SELECT series_id, seq, COUNT(*) FROM points GROUP BY series_id, seq"
        " ORDER BY series_id, seq"
    )
    for series_id, seq_lo, seq_hi in _plan_chunks(commits):
        # NULL was how SQLite stored NaN; numpy reads None as NaN.
        points = db.execute(
            "SELECT seq, step, time, value FROM points"
            " WHERE series_id = ? AND seq BETWEEN ? AND ? ORDER BY seq, rowid",
            (series_id, seq_lo, seq_hi),
        ).fetchall()
        seqs, steps, times, values = zip(*points, strict=True)
        columns = Columns(
            np.array(steps, dtype=np.int64),
            np.array(times, dtype=np.float64),
            np.array(values, dtype=np.float64),
        )
        chunk = chunks.pack_commits(columns, np.array(seqs, dtype=np.int64))
        db.execute(_INSERT_CHUNK, (series_id, *chunk))
    db.execute("DROP TABLE points")


def _plan_chunks(commits: Iterable[tuple[int, int, int]]) -> Iterable[tuple[int, int, int]]:
    """``(series_id, seq, points)`` per commit, in order -> ``(series_id, seq_lo,
    seq_hi)`` per chunk: consecutive commits of a series until SMALL_CHUNK points."""
    current: list[int] | None = None  # series_id, seq_lo, seq_hi, points
    for series_id, seq, count in commits:
        if current is not None and current[0] == series_id and current[3] < SMALL_CHUNK:
            current[2] = seq
            current[3] += count
            continue
        if current is not None:
            yield current[0], current[1], current[2]
        current = [series_id, seq, seq, count]
    if current is not None:
        yield current[0], current[1], current[2]
