"""Share tokens, kept in the server's SQLite file as SHA-256 digests.

A token is shown once, when it is made; afterwards only its short public id (for
``trainwire token revoke``) and its digest exist. Looking a token up by its digest
takes the same time whatever the token, so it leaks nothing to a timing attacker.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from trainwire.exceptions import StorageError
from trainwire.storage.sqlite import SQLiteStore

__all__ = ["TokenInfo", "TokenStore", "digest", "new_secret"]


def new_secret() -> str:
    """A fresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    scope: str
    created: float
    expires: float | None
    revoked: bool
    note: str


class TokenStore:
    """The tokens of one data directory.

    Args:
        db_path: the server's database (``trainwire.db``); its schema is created or
            upgraded first, so the CLI can make tokens before the server ever ran.
    """

    def __init__(self, db_path: Path) -> None:
        SQLiteStore(db_path).close()  # creates or migrates the schema
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {db_path}: {exc}") from exc

    def create(
        self, scope: str, now: float, expires: float | None, note: str = ""
    ) -> tuple[str, str]:
        """Make a token. Returns its public id and the secret, which is not kept."""
        secret = new_secret()
        token_id = digest(secret)[:10]
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (id, hash, scope, created, expires, note)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, digest(secret), scope, now, expires, note),
            )
        return token_id, secret

    def scope_of(self, secret: str, now: float) -> str | None:
        """The scope of a valid token; None if unknown, revoked or expired."""
        with self._lock:
            row = self._db.execute(
                "SELECT scope, expires, revoked FROM tokens WHERE hash = ?", (digest(secret),)
            ).fetchone()
        if row is None:
            return None
        scope, expires, revoked = row
        if revoked or (expires is not None and expires <= now):
            return None
        return str(scope)

    def revoke(self, token: str) -> bool:
        """Revoke by public id or by the token itself. Returns whether one matched."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE tokens SET revoked = 1 WHERE id = ? OR hash = ?", (token, digest(token))
            )
        return cursor.rowcount > 0

    def list(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, scope, created, expires, revoked, note FROM tokens ORDER BY created"
            ).fetchall()
        return [TokenInfo(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
