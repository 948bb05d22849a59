"""The user store: users, their labelled pairs and their cached latents, in one SQLite file (WAL mode).

- Tokens are never stored, only their SHA-256 (a token is 32 random bytes, so a plain hash suffices).
- Pairs are append-only; each user's `version` counts their changes, and a cached latent records the version it
  was computed from, so a stale latent is never served.
- One connection per thread; writes are serialized in-process and wait (`busy_timeout`) on other processes.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    prompt TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_user ON pairs(user_id, id);
CREATE TABLE IF NOT EXISTS latents (
    user_id TEXT PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    z BLOB NOT NULL,
    mean BLOB NOT NULL,
    logvar BLOB NOT NULL
);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class UserLatent:
    """A user's posterior N(mean, exp(logvar)) and the latent `z` the reward uses, at a pair-set `version`."""

    version: int
    z: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


def _to_blob(tensor: torch.Tensor) -> bytes:
    return tensor.detach().float().cpu().contiguous().numpy().tobytes()


def _from_blob(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.float32).view(1, -1)


class UserStore:
    """Users, pairs and latents in SQLite at `path` (created with its folder when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._write_lock, self._connection() as db:
            db.executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions below
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupted
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    def _write(self, statements) -> Any:
        """Run `statements(db)` in one immediate transaction, serialized with this process's other writes."""
        with self._write_lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = statements(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    # ----- users ------------------------------------------------------------------------------------------

    def create_user(self) -> tuple[str, str]:
        """A new user: `(user_id, token)`; only the token's hash is kept."""
        user_id, token = "u_" + secrets.token_hex(8), secrets.token_urlsafe(32)
        self._write(lambda db: db.execute("INSERT INTO users (user_id, token_hash, created) VALUES (?, ?, ?)",
                                          (user_id, hash_token(token), time.time())))
        return user_id, token

    def user_for_token(self, token: str) -> str | None:
        query = "SELECT user_id FROM users WHERE token_hash = ?"
        row = self._connection().execute(query, (hash_token(token),)).fetchone()
        return row[0] if row else None

    def version(self, user_id: str) -> int | None:
        """The user's pair-set version (None: no such user)."""
        row = self._connection().execute("SELECT version FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def delete_user(self, user_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)))

    def count_users(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM users").fetchone()[0]

    # ----- pairs ------------------------------------------------------------------------------------------

    def add_pairs(self, user_id: str, pairs: list[dict[str, str]], max_pairs: int) -> int:
        """Append `pairs` to the user's; returns their new total. Raises `PairLimitError` past `max_pairs`."""
        def statements(db: sqlite3.Connection) -> int:
            total = db.execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()[0]
            if total + len(pairs) > max_pairs:
                raise PairLimitError(
                    f"user {user_id} has {total} pairs; {len(pairs)} more would pass the limit of {max_pairs}."
                )
            now = time.time()
            db.executemany(
                "INSERT INTO pairs (user_id, prompt, chosen, rejected, created) VALUES (?, ?, ?, ?, ?)",
                [(user_id, p["prompt"], p["chosen"], p["rejected"], now) for p in pairs],
            )
            db.execute("UPDATE users SET version = version + 1 WHERE user_id = ?", (user_id,))
            return total + len(pairs)

        return self._write(statements)

    def pairs(self, user_id: str) -> tuple[int, list[dict[str, str]]]:
        """The user's version and pairs, in the order they were given (one consistent read)."""
        db = self._connection()
        db.execute("BEGIN")
        try:
            version = db.execute("SELECT version FROM users WHERE user_id = ?", (user_id,)).fetchone()[0]
            rows = db.execute(
                "SELECT prompt, chosen, rejected FROM pairs WHERE user_id = ? ORDER BY id", (user_id,)
            ).fetchall()
        finally:
            db.execute("COMMIT")
        return version, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]

    def count_pairs(self, user_id: str | None = None) -> int:
        if user_id is None:
            return self._connection().execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        return self._connection().execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()[0]

    # ----- latents ----------------------------------------------------------------------------------------

    def save_latent(self, user_id: str, latent: UserLatent) -> None:
        """Keep the latent unless a newer one is stored already (two requests may compute it at once)."""
        self._write(lambda db: db.execute(
            "INSERT INTO latents (user_id, version, z, mean, logvar) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, z = excluded.z, mean = excluded.mean, "
            "logvar = excluded.logvar WHERE excluded.version >= latents.version",
            (user_id, latent.version, _to_blob(latent.z), _to_blob(latent.mean), _to_blob(latent.logvar)),
        ))

    def latent(self, user_id: str, version: int) -> UserLatent | None:
        """The stored latent of the user at `version`, or None."""
        row = self._connection().execute(
            "SELECT z, mean, logvar FROM latents WHERE user_id = ? AND version = ?", (user_id, version)
        ).fetchone()
        return None if row is None else UserLatent(version, *(_from_blob(b) for b in row))


class PairLimitError(ValueError):
    """A user's pairs would pass the store's limit."""
