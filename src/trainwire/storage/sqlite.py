"""SQLite storage: one file, WAL mode, schema versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunInfo, RunSpec, RunStatus, Series
from trainwire.storage.base import Commit

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "SeriesLimitExceeded"]

SCHEMA_VERSION: Final = 2

# Each entry upgrades the schema from version i to i + 1.
_MIGRATIONS: Final = [
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
]

_RUN_COLUMNS: Final = "id, project, name, status, created, updated, config"


class SQLiteStore:
    """A :class:`~trainwire.storage.base.Store` in one SQLite file.

    Args:
        path: the database file; its folder is created if missing.
        max_series_per_run: refuse a batch that would give a run more metric keys
            (``SeriesLimitExceeded``); checked here, where every writer of the run
            meets, so no number of connections or ranks gets around it.

    Raises:
        StorageError: the file cannot be opened, or was written by a newer trainwire.
    """

    def __init__(self, path: Path | str, *, max_series_per_run: int | None = None) -> None:
        self.path = Path(path)
        self.max_series_per_run = max_series_per_run
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        self._series_ids: dict[tuple[str, str], int] = {}

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
            self._db.executescript(
                f"BEGIN IMMEDIATE; {step} PRAGMA user_version = {target}; COMMIT;"
            )

    # -- writes ---------------------------------------------------------------------

    def open_run(self, spec: RunSpec, stream: str, now: float) -> int:
        with self._lock, self._transaction():
            exists = self._db.execute("SELECT 1 FROM runs WHERE id = ?", (spec.id,)).fetchone()
            if exists is None:
                self._db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        spec.id,
                        spec.project,
                        spec.name,
                        RunStatus.RUNNING,
                        now,
                        now,
                        msgspec.json.encode(spec.config, enc_hook=str).decode(),
                    ),
                )
            row = self._db.execute(
                "SELECT last_seq FROM streams WHERE run_id = ? AND stream = ?", (spec.id, stream)
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO streams (run_id, stream, last_seq, status) VALUES (?, ?, 0, ?)",
                    (spec.id, stream, RunStatus.RUNNING),
                )
            else:
                # A writer back after the server declared it crashed. A finished
                # stream stays finished: this is a resend of what it already has.
                self._db.execute(
                    "UPDATE streams SET status = ? WHERE run_id = ? AND stream = ? AND status = ?",
                    (RunStatus.RUNNING, spec.id, stream, RunStatus.CRASHED),
                )
            self._settle_status(spec.id, now)
            return 0 if row is None else int(row[0])

    def append_batch(
        self, run_id: str, stream: str, batch: Batch, now: float, prefix: str = ""
    ) -> Commit | None:
        with self._lock, self._transaction():
            if not self._claim_seq(run_id, stream, batch.seq):
                return None
            prev, commit = self._next_commit(run_id, now)
            points = []
            for step, time, values in batch.rows:
                for key, value in values.items():
                    series_id = self._series_id(run_id, prefix + key)
                    points.append((series_id, commit, step, time, value))
            self._db.executemany(
                "INSERT INTO points (series_id, seq, step, time, value) VALUES (?, ?, ?, ?, ?)",
                points,
            )
            return Commit(prev_seq=prev, seq=commit)

    def set_status(
        self, run_id: str, stream: str, status: str, seq: int, now: float
    ) -> RunInfo | None:
        with self._lock, self._transaction():
            if not self._claim_seq(run_id, stream, seq):
                return None
            self._db.execute(
                "UPDATE streams SET status = ? WHERE run_id = ? AND stream = ?",
                (status, run_id, stream),
            )
            return self._settle_status(run_id, now)

    def mark_crashed(self, run_id: str, now: float) -> RunInfo | None:
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE streams SET status = ? WHERE run_id = ? AND status = ?",
                (RunStatus.CRASHED, run_id, RunStatus.RUNNING),
            )
            return self._settle_status(run_id, now)

    def delete_run(self, run_id: str) -> bool:
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM points WHERE series_id IN (SELECT id FROM series WHERE run_id = ?)",
                (run_id,),
            )
            self._db.execute("DELETE FROM series WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM streams WHERE run_id = ?", (run_id,))
            deleted = self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0
        self._series_ids = {k: v for k, v in self._series_ids.items() if k[0] != run_id}
        return deleted

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
            if status in statuses:
                break
        else:
            return self._run(run_id)
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
            raise StorageError(f"no stream {stream!r} in run {run_id!r}")
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

    def _series_id(self, run_id: str, key: str) -> int:
        cached = self._series_ids.get((run_id, key))
        if cached is not None:
            return cached
        row = self._db.execute(
            "SELECT id FROM series WHERE run_id = ? AND key = ?", (run_id, key)
        ).fetchone()
        if row is None:
            if self.max_series_per_run is not None:
                (count,) = self._db.execute(
                    "SELECT COUNT(*) FROM series WHERE run_id = ?", (run_id,)
                ).fetchone()
                if count >= self.max_series_per_run:
                    raise SeriesLimitExceeded(
                        f"run has more than {self.max_series_per_run} metric keys"
                    )
            row = self._db.execute(
                "INSERT INTO series (run_id, key) VALUES (?, ?) RETURNING id", (run_id, key)
            ).fetchone()
        series_id: int = row[0]
        self._series_ids[(run_id, key)] = series_id
        return series_id

    def _transaction(self) -> _Transaction:
        # On rollback, forget cached series ids: they may name rows that were undone.
        return _Transaction(self._db, on_rollback=self._series_ids.clear)

    # -- reads ----------------------------------------------------------------------

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created DESC"
            ).fetchall()
        return [_run_info(row) for row in rows]

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
        query = (
            "SELECT s.key, p.step, p.time, p.value FROM points p"
            " JOIN series s ON s.id = p.series_id"
            " WHERE s.run_id = ? AND p.seq > ?"
        )
        params: list[Any] = [run_id, after]
        if keys is not None:
            query += f" AND s.key IN ({', '.join('?' * len(keys))})"
            params.extend(keys)
        query += " ORDER BY p.series_id, p.seq, p.rowid"
        with self._lock, self._transaction():
            row = self._db.execute("SELECT commit_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
            last_seq: int = 0 if row is None else row[0]
            rows = self._db.execute(query, params).fetchall()
        series: dict[str, Series] = {}
        for key, step, time, value in rows:
            entry = series.get(key)
            if entry is None:
                entry = series[key] = Series(step=[], time=[], value=[])
            entry.step.append(step)
            entry.time.append(time)
            entry.value.append(math.nan if value is None else value)
        return last_seq, series

    def integrity_check(self) -> str:
        """SQLite's own consistency check: ``"ok"`` when the file is sound."""
        with self._lock:
            result: str = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        return result

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SeriesLimitExceeded(StorageError):
    """A batch would give its run more metric keys than allowed."""


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
    run_id, project, name, status, created, updated, config = row
    return RunInfo(
        id=run_id,
        project=project,
        name=name,
        status=status,
        created=created,
        updated=updated,
        config=json.loads(config),
    )
