"""SQLite storage: one file, WAL mode, schema versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunInfo, RunSpec, RunStatus, Series
from trainwire.storage.base import Commit

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 1

# Each entry upgrades the schema from version i to i + 1.
_MIGRATIONS: Final = [
    """
    CREATE TABLE runs (
        id       TEXT PRIMARY KEY,
        project  TEXT NOT NULL,
        name     TEXT NOT NULL,
        status   TEXT NOT NULL,
        created  REAL NOT NULL,
        updated  REAL NOT NULL,
        config   TEXT NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0
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
]

_RUN_COLUMNS: Final = "id, project, name, status, created, updated, config"


class SQLiteStore:
    """A :class:`~trainwire.storage.base.Store` in one SQLite file.

    Args:
        path: the database file; its folder is created if missing.

    Raises:
        StorageError: the file cannot be opened, or was written by a newer trainwire.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the server's thread pool under a lock: SQLite
        # serialises writers anyway, and reads under the same lock see a batch and its
        # run's last_seq together, which the dashboards' no-gap resume relies on.
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

    def open_run(self, spec: RunSpec, now: float) -> int:
        with self._lock, self._transaction():
            row = self._db.execute("SELECT last_seq FROM runs WHERE id = ?", (spec.id,)).fetchone()
            if row is None:
                self._db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    (
                        spec.id,
                        spec.project,
                        spec.name,
                        RunStatus.RUNNING,
                        now,
                        now,
                        json.dumps(spec.config, default=str, allow_nan=True),
                    ),
                )
                return 0
            self._db.execute(
                "UPDATE runs SET status = ?, updated = ? WHERE id = ?",
                (RunStatus.RUNNING, now, spec.id),
            )
            last_seq: int = row[0]
            return last_seq

    def append_batch(self, run_id: str, batch: Batch, now: float) -> Commit | None:
        with self._lock, self._transaction():
            prev = self._claim_seq(run_id, batch.seq, now)
            if prev is None:
                return None
            points = []
            for step, time, values in batch.rows:
                for key, value in values.items():
                    points.append((self._series_id(run_id, key), batch.seq, step, time, value))
            self._db.executemany(
                "INSERT INTO points (series_id, seq, step, time, value) VALUES (?, ?, ?, ?, ?)",
                points,
            )
            return Commit(prev_seq=prev, seq=batch.seq)

    def set_status(self, run_id: str, status: str, seq: int, now: float) -> RunInfo | None:
        with self._lock, self._transaction():
            if self._claim_seq(run_id, seq, now) is None:
                return None
            self._db.execute("UPDATE runs SET status = ? WHERE id = ?", (status, run_id))
            return self._run(run_id)

    def _claim_seq(self, run_id: str, seq: int, now: float) -> int | None:
        """Move the run's last_seq to ``seq``; the previous value, or None if not newer."""
        row = self._db.execute("SELECT last_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise StorageError(f"no run {run_id!r}")
        prev: int = row[0]
        if seq <= prev:
            return None
        self._db.execute(
            "UPDATE runs SET last_seq = ?, updated = ? WHERE id = ?", (seq, now, run_id)
        )
        return prev

    def _series_id(self, run_id: str, key: str) -> int:
        cached = self._series_ids.get((run_id, key))
        if cached is not None:
            return cached
        self._db.execute("INSERT OR IGNORE INTO series (run_id, key) VALUES (?, ?)", (run_id, key))
        series_id: int = self._db.execute(
            "SELECT id FROM series WHERE run_id = ? AND key = ?", (run_id, key)
        ).fetchone()[0]
        self._series_ids[(run_id, key)] = series_id
        return series_id

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

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
            row = self._db.execute("SELECT last_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
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


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error, sqlite3 errors translated."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

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
                raise StorageError(str(commit_error)) from commit_error
        self._db.execute("ROLLBACK")
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
