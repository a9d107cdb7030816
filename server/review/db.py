"""The review database: ``STORE/review.sqlite`` (users, edits, chunk versions, review
state, queue leases).

WAL journal with ``synchronous=FULL``: a committed edit survives a crash of the process
or the machine, so it is committed *before* the edit is acknowledged; the zarr write
happens after, and ``pending_edits`` replays what a crash left unwritten.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from segloop.review.edits import unpack

DB_NAME = "review.sqlite"
ROLES = ("viewer", "annotator", "reviewer", "admin")  # each includes the ones before
STATES = ("unseen", "in_review", "accepted", "corrected", "flagged")
FLAG_REASONS = ("unsure", "out_of_distribution", "bad_image_quality")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, role TEXT NOT NULL,
    token_sha256 TEXT UNIQUE NOT NULL, created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
    created REAL NOT NULL, op TEXT NOT NULL, label INTEGER, body TEXT NOT NULL,
    chunks TEXT NOT NULL,            -- JSON list of "cy/cx" at level 0
    delta BLOB NOT NULL,             -- compressed changed pixels: index, before, after
    pixels INTEGER NOT NULL,         -- how many pixels the delta changes
    reverts INTEGER REFERENCES edits(id),   -- undo: the edit it reverts; redo: the undo
    undone INTEGER NOT NULL DEFAULT 0,      -- 1 while reverted by an undo
    status TEXT NOT NULL DEFAULT 'applied', -- annotators: proposed → approved/rejected
    applied INTEGER NOT NULL DEFAULT 0,     -- 1 once written to zarr
    client_id TEXT UNIQUE);                 -- the client's id of the edit (re-sends)
CREATE INDEX IF NOT EXISTS edits_user ON edits(user_id, id);
CREATE INDEX IF NOT EXISTS edits_pending ON edits(applied) WHERE applied = 0;
CREATE TABLE IF NOT EXISTS versions (
    layer TEXT NOT NULL, level INTEGER NOT NULL, cy INTEGER NOT NULL, cx INTEGER NOT NULL,
    version INTEGER NOT NULL, PRIMARY KEY (layer, level, cy, cx));
CREATE TABLE IF NOT EXISTS review (
    cy INTEGER NOT NULL, cx INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT,
    comment TEXT, user_id INTEGER, updated REAL NOT NULL,
    seconds REAL,                    -- time from lease (or in_review) to this state
    PRIMARY KEY (cy, cx));
CREATE TABLE IF NOT EXISTS leases (
    cy INTEGER NOT NULL, cx INTEGER NOT NULL, user_id INTEGER NOT NULL,
    started REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (cy, cx));
"""
#: review states that mean a human vouched for the whole tile
FINAL_STATES = ("accepted", "corrected")


def hash_token(token: str) -> str:
    """Tokens are 256 random bits, so a plain SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


class ReviewDB:
    """One connection, used from one thread at a time (a lock serialises callers)."""

    def __init__(self, store: Path) -> None:
        self.path = store / DB_NAME
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self._users: dict[str, dict[str, Any]] = {}  # token hash → user (see user_by_token)
        self._data_version: int | None = None
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def tx(self):
        """``with db.tx():`` — one IMMEDIATE transaction, committed (fsync'd) on exit."""
        return _Tx(self)

    # --- users -------------------------------------------------------------------------

    def add_user(self, name: str, role: str) -> str:
        """Create a user; returns its bearer token (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        with self.tx() as c:
            c.execute(
                "INSERT INTO users (name, role, token_sha256, created) VALUES (?,?,?,?)",
                (name, role, hash_token(token), time.time()),
            )
        return token

    def user_by_token(self, token: str) -> dict[str, Any] | None:
        """The active user of a token. Known users are kept in memory until another
        connection (``segloop users revoke`` in another process) changes the database:
        SQLite's ``data_version`` tells, for a fraction of the query's cost."""
        digest = hash_token(token)
        with self.lock:
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._users.clear()
                self._data_version = version
            user = self._users.get(digest)
            if user is None:
                row = self.conn.execute(
                    "SELECT id, name, role FROM users WHERE token_sha256 = ? AND revoked IS NULL",
                    (digest,),
                ).fetchone()
                if row is None:
                    return None
                user = dict(row)
                if len(self._users) < 10_000:  # bounded: tokens come from the network
                    self._users[digest] = user
        return dict(user)

    def users(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT id, name, role, created, revoked FROM users ORDER BY id"
            ).fetchall()
        return [dict(r) for r in rows]

    def revoke(self, name: str) -> bool:
        with self.tx() as c:
            cur = c.execute(
                "UPDATE users SET revoked = ? WHERE name = ? AND revoked IS NULL",
                (time.time(), name),
            )
            self._users.clear()  # this connection's own writes leave data_version alone
        return cur.rowcount > 0

    # --- versions ----------------------------------------------------------------------

    def versions(self, layer: str, level: int) -> dict[tuple[int, int], int]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT cy, cx, version FROM versions WHERE layer = ? AND level = ?", (layer, level)
            ).fetchall()
        return {(r["cy"], r["cx"]): r["version"] for r in rows}

    def edits_by_tile(self) -> dict[tuple[int, int], list[dict[str, Any]]]:
        """Every edit with its author, per level-0 tile it touched, newest first; deltas
        unpacked (export and agreement rewind them)."""
        out: dict[tuple[int, int], list[dict[str, Any]]] = {}
        with self.lock:
            rows = self.conn.execute(
                "SELECT e.id, e.created, e.op, e.status, e.chunks, e.delta, u.name AS user, "
                "u.role FROM edits e JOIN users u ON u.id = e.user_id ORDER BY e.id DESC"
            ).fetchall()
        for r in rows:
            row = {**dict(r), "delta": unpack(r["delta"])}
            for key in json.loads(row["chunks"]):
                out.setdefault(tuple(map(int, key.split("/"))), []).append(row)
        return out

    @staticmethod
    def human_tiles(store: Path) -> set[tuple[int, int]]:
        """Level-0 tiles a human edited, accepted or marked corrected (empty when the
        store was never reviewed; no database is created)."""
        if not (store / DB_NAME).exists():
            return set()
        db = ReviewDB(store)
        try:
            with db.lock:
                out = {
                    (r[0], r[1])
                    for r in db.conn.execute(
                        f"SELECT cy, cx FROM review WHERE state IN {FINAL_STATES}"
                    )
                }
                for (chunks,) in db.conn.execute("SELECT chunks FROM edits"):
                    out |= {tuple(map(int, k.split("/"))) for k in json.loads(chunks)}
        finally:
            db.close()
        return out

    @staticmethod
    def bump_versions(store: Path, tiles: set[tuple[int, int]], levels: int) -> None:
        """New versions for the segmentation chunks of ``tiles`` at every level (after a
        re-segmentation wrote them), in one transaction."""
        db = ReviewDB(store)
        try:
            with db.tx() as c:
                keys = set(tiles)
                for level in range(levels):
                    c.executemany(
                        "INSERT INTO versions VALUES ('segmentation', ?, ?, ?, 1) "
                        "ON CONFLICT DO UPDATE SET version = version + 1",
                        [(level, cy, cx) for cy, cx in sorted(keys)],
                    )
                    keys = {(cy // 2, cx // 2) for cy, cx in keys}
        finally:
            db.close()

    def all_versions(self) -> dict[tuple[str, int, int, int], int]:
        with self.lock:
            rows = self.conn.execute("SELECT layer, level, cy, cx, version FROM versions")
            return {(r[0], r[1], r[2], r[3]): r[4] for r in rows.fetchall()}


class _Tx:
    def __init__(self, db: ReviewDB) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.lock.acquire()
        self.db.conn.execute("BEGIN IMMEDIATE")
        return self.db.conn

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.db.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.db.lock.release()
