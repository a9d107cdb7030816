"""The review database: ``STORE/segloop/review.sqlite`` (users, edits, chunk versions, review
state, queue leases). The only module that speaks SQL to it: the others call the named
methods of ``ReviewDB`` (the tile pack's cache, ``tile_pack.py``, is a file of its own).

WAL journal with ``synchronous=FULL``: a committed edit survives a crash of the process
or the machine, so it is committed *before* the edit is acknowledged; the zarr write
happens after, and ``pending_edits`` replays what a crash left unwritten.

Three connections, each behind its own lock, so a slow one never stalls the others:
``conn`` for reads, one for token lookups (every request), one for write transactions
(``tx``). In WAL mode reads never wait for a writer; a write waits at most ``BUSY_S`` for
another process's lock and then raises ``Busy`` (the server answers 503 + Retry-After).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from segloop.io.ome_zarr import own_path
from segloop.review.chunks import ChunkKey
from segloop.review.edits import unpack_lazy, unpack_part

DB_NAME = "review.sqlite"
ROLES = ("viewer", "annotator", "reviewer", "admin")  # each includes the ones before
#: the roles whose word is a verdict: they accept tiles and decide annotators' proposals
EXPERTS = ("reviewer", "admin")
#: review states; an annotator's "corrected" is stored as "correction_proposed" until a
#: reviewer decides (only "accepted" and "corrected" are trusted as a human's verdict)
STATES = ("unseen", "in_review", "accepted", "corrected", "flagged", "correction_proposed")
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
-- covering indexes: undo, stats, export and agreement never read the delta blobs (the
-- columns after them would otherwise walk each blob's overflow pages)
CREATE INDEX IF NOT EXISTS edits_by_user ON edits(user_id, id, op, status, undone, pixels);
CREATE INDEX IF NOT EXISTS edits_meta ON edits(id, user_id, created, op, status, chunks);
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
CREATE TABLE IF NOT EXISTS usage (   -- bytes of stored deltas per user (the edit quota)
    user_id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
-- continuous learning (segloop.learn): model versions and what they changed
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY, parent INTEGER, created REAL NOT NULL,
    status TEXT NOT NULL,            -- see MODEL_STATES
    info TEXT NOT NULL);             -- JSON: scores before/after, training set, round
CREATE TABLE IF NOT EXISTS model_updates (
    id INTEGER PRIMARY KEY, version INTEGER NOT NULL, kind TEXT NOT NULL,  -- learned/rollback
    user_id INTEGER REFERENCES users(id), at REAL NOT NULL,
    tiles TEXT NOT NULL);            -- JSON list of [cy, cx] re-predicted (level 0)
"""
#: a model version's status: the one ``served`` (its predictions are what tiles show),
#: ``kept`` (served before, superseded by a better child), ``rejected`` (scored worse
#: than its parent: never served), ``retired`` (rolled back), ``failed`` (its round died)
MODEL_STATES = ("served", "kept", "rejected", "retired", "failed")
#: seconds a write waits for another process's lock on the database before ``Busy``
BUSY_S = 2.0
#: bytes of stored edits (compressed deltas) each user may keep in a store
#: (``SEGLOOP_EDIT_QUOTA_MB``, default 1024)
EDIT_QUOTA_BYTES = int(float(os.environ.get("SEGLOOP_EDIT_QUOTA_MB", "1024")) * 2**20)
#: an edit is refused (507) when the store's disk has less free space than this
#: (``SEGLOOP_MIN_FREE_MB``, default 64)
MIN_FREE_BYTES = int(float(os.environ.get("SEGLOOP_MIN_FREE_MB", "64")) * 2**20)


class Busy(Exception):
    """Another process holds the database's write lock (→ 503, retry later)."""


class Full(Exception):
    """No room for the edit: the disk is full or the user's edit quota is spent (→ 507)."""


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an ``sqlite3.Error`` (5 busy, 13 full, …)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def translate(exc: BaseException) -> BaseException:
    """sqlite3 errors that mean "busy" or "full" → ``Busy`` / ``Full``; others unchanged."""
    code = sqlite_code(exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Busy("the review database is locked by another process; retry shortly")
    if code == sqlite3.SQLITE_FULL:
        return Full("disk full: the review database cannot grow; free space and retry")
    return exc


class Damaged(Exception):
    """``review.sqlite`` fails its integrity check (or is not a database at all)."""


def quick_check(path: Path) -> None:
    """Raise ``Damaged`` unless ``path`` (a review database) passes ``PRAGMA
    quick_check``; read-only, no database is created."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_S)
        try:
            rows = conn.execute("PRAGMA quick_check(1)").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if sqlite_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return  # another process writes it: not damaged
        raise Damaged(str(exc)) from None
    if rows != [("ok",)]:
        raise Damaged(" ".join(rows[0][0].replace("*", "").split()))  # one line


def integrity_check(path: Path) -> list[str]:
    """The lines of ``PRAGMA integrity_check`` on a review database, read-only (["ok"]:
    intact); ``sqlite3.DatabaseError`` when it is not a database at all."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def require_intact(store: Path) -> None:
    """``UserError`` (one line) if ``STORE/review.sqlite`` exists and is damaged."""
    from segloop.errors import UserError

    path = own_path(store, DB_NAME)
    if not path.exists():
        return
    try:
        quick_check(path)
    except Damaged as exc:
        raise UserError(
            f"{path} is damaged ({exc}); restore it from a backup, or move it away to start "
            "the review afresh"
        ) from None


#: review states that mean a human vouched for the whole tile
FINAL_STATES = ("accepted", "corrected")
#: states that are a reviewer's verdict when a reviewer set them: annotators leave them be
VERDICTS = ("accepted", "corrected", "flagged")


class VerdictTaken(Exception):
    """An annotator would change the verdict an expert gave a tile (→ 403)."""

    def __init__(self, state: str, user: str) -> None:
        super().__init__(f"{state} by {user}")
        self.state, self.user = state, user


def hash_token(token: str) -> str:
    """Tokens are 256 random bits, so a plain SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


class ReviewDB:
    """Three connections (reads, token lookups, writes), each used by one thread at a
    time behind its lock (``lock`` guards ``conn``, the one for reads)."""

    def __init__(self, store: Path) -> None:
        self.path = own_path(store, DB_NAME)
        self.store = store
        self.wconn = self._connect()
        self.wlock = threading.RLock()
        with self.wlock:
            self.wconn.execute("PRAGMA journal_mode=WAL")
            fresh = not self.wconn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'usage'"
            ).fetchone()
            self.wconn.executescript(SCHEMA)
            if fresh:  # a database of an older version: count the usage once
                self.wconn.execute(
                    "INSERT OR IGNORE INTO usage SELECT user_id, SUM(length(delta)) FROM edits "
                    "GROUP BY user_id"
                )
        self.conn, self.lock = self._connect(), threading.RLock()
        self._aconn, self._alock = self._connect(), threading.Lock()
        self._users: dict[str, dict[str, Any]] = {}  # token hash → user (see user_by_token)
        self._data_version: int | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_S
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def close(self) -> None:
        for lock, conn in ((self.lock, self.conn), (self._alock, self._aconn)):
            with lock:
                conn.close()
        with self.wlock:
            self.wconn.close()

    def tx(self):
        """``with db.tx() as c:`` — one IMMEDIATE transaction on the write connection,
        committed (fsync'd) on exit, rolled back on an error; the lock is released on
        every path. Raises ``Busy`` when another process holds the database longer than
        ``BUSY_S``, ``Full`` when the disk is."""
        return _Tx(self)

    def active_user_ids(self) -> set[int]:
        with self._alock:
            return {r[0] for r in self._aconn.execute("SELECT id FROM users WHERE revoked IS NULL")}

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
        with self._alock:
            version = self._aconn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._users.clear()
                self._data_version = version
            user = self._users.get(digest)
            if user is None:
                row = self._aconn.execute(
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
        with self._alock:
            self._users.clear()
        return cur.rowcount > 0

    # --- versions ----------------------------------------------------------------------

    def versions(self, layer: str, level: int) -> dict[tuple[int, int], int]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT cy, cx, version FROM versions WHERE layer = ? AND level = ?", (layer, level)
            ).fetchall()
        return {(r["cy"], r["cx"]): r["version"] for r in rows}

    def edits_by_tile(self) -> dict[tuple[int, int], list[dict[str, Any]]]:
        """Every edit with its author, per level-0 tile it touched, newest first; no deltas
        (read them one at a time with ``DeltaReader``). Streams the covering index."""
        out: dict[tuple[int, int], list[dict[str, Any]]] = {}
        rows: dict[int, dict[str, Any]] = {}
        with self.lock:
            cur = self.conn.execute(
                "SELECT e.id, e.created, e.op, e.status, e.chunks, u.name AS user, u.role "
                "FROM edits e INDEXED BY edits_meta JOIN users u ON u.id = e.user_id "
                "ORDER BY e.id DESC"
            )
            for r in cur:
                row = rows.setdefault(r["id"], dict(r))
                for key in json.loads(row.pop("chunks")):
                    out.setdefault(ChunkKey.parse(key).yx, []).append(row)
        return out

    @staticmethod
    def human_tiles(store: Path) -> set[tuple[int, int]]:
        """Level-0 tiles a human edited, accepted or marked corrected (empty when the
        store was never reviewed; no database is created)."""
        if not (own_path(store, DB_NAME)).exists():
            return set()
        db = ReviewDB(store)
        try:
            return db.human()
        finally:
            db.close()

    def human(self) -> set[tuple[int, int]]:
        """Level-0 tiles a human edited, accepted or marked corrected."""
        with self.lock:
            rows = self.conn.execute(f"SELECT cy, cx FROM review WHERE state IN {FINAL_STATES}")
            out = {(r[0], r[1]) for r in rows}
            for (chunks,) in self.conn.execute("SELECT chunks FROM edits"):
                out |= {ChunkKey.parse(k).yx for k in json.loads(chunks)}
        return out

    def leased(self) -> set[tuple[int, int]]:
        """Level-0 tiles lent to someone right now (a reviewer is looking at them)."""
        with self.lock:
            rows = self.conn.execute("SELECT cy, cx FROM leases WHERE expires > ?", (time.time(),))
            return {(r[0], r[1]) for r in rows}

    def set_versions(self, versions: dict[tuple[str, ChunkKey], int]) -> None:
        """Store new chunk versions ((layer, chunk) → version), in one transaction."""
        with self.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?)",
                [(layer, *key, v) for (layer, key), v in versions.items()],
            )

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

    def all_versions(self) -> dict[tuple[str, ChunkKey], int]:
        """(layer, chunk) → version of every chunk edited (or re-segmented) so far."""
        with self.lock:
            rows = self.conn.execute("SELECT layer, level, cy, cx, version FROM versions")
            return {(r[0], ChunkKey(r[1], r[2], r[3])): r[4] for r in rows.fetchall()}

    # --- edits -------------------------------------------------------------------------

    def add_edit(
        self,
        user: dict[str, Any],
        op: str,
        label: int | None,
        body: dict[str, Any],
        blob: bytes,
        chunks: list[str],
        pixels: int,
        versions: dict[ChunkKey, int],
        reverts: int | None = None,
        status: str = "applied",
        undone: tuple[int, int] | None = None,
        client_id: str | None = None,
        decided: tuple[str, int] | None = None,
    ) -> int:
        """Commit one edit (its packed delta ``blob`` over the level-0 ``chunks``) with the
        new segmentation ``versions``, in one transaction; returns its id. ``undone``:
        (flag, edit id) to set (``set_undone``); ``decided``: (status, edit id) of the
        proposal it rejects. A drawing edit (``reverts`` None) past the user's edit quota
        raises ``Full``."""
        with self.tx() as c:
            if reverts is None:  # undo, redo and rejections stay possible past the quota
                row = c.execute("SELECT bytes FROM usage WHERE user_id = ?", (user["id"],))
                used = (row.fetchone() or (0,))[0]
                if used + len(blob) > EDIT_QUOTA_BYTES:
                    raise Full(
                        f"edit quota reached: {user['name']} stores {used >> 20} MB of edits "
                        f"in this store, the limit is {EDIT_QUOTA_BYTES >> 20} MB "
                        "(SEGLOOP_EDIT_QUOTA_MB)"
                    )
            c.execute(
                "INSERT INTO usage VALUES (?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET bytes = bytes + excluded.bytes",
                (user["id"], len(blob)),
            )
            cur = c.execute(
                "INSERT INTO edits (user_id, created, op, label, body, chunks, delta, pixels,"
                " reverts, status, client_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    user["id"],
                    time.time(),
                    op,
                    label,
                    json.dumps(body),
                    json.dumps(chunks),
                    blob,
                    pixels,
                    reverts,
                    status,
                    client_id,
                ),
            )
            if undone is not None:
                _set_undone(c, *undone)
            if decided is not None:
                c.execute("UPDATE edits SET status = ? WHERE id = ?", decided)
            c.executemany(
                "INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?)",
                [("segmentation", *key, v) for key, v in versions.items()],
            )
        return cur.lastrowid

    def mark_reverted(self, edit_id: int, status: str | None = None) -> None:
        """Mark ``edit_id`` (and its chain, ``set_undone``) reverted without a new edit
        (nothing of it was left to put back); ``status``: its new status, if any."""
        with self.tx() as c:
            _set_undone(c, 1, edit_id)
            if status is not None:
                c.execute("UPDATE edits SET status = ? WHERE id = ?", (status, edit_id))

    def set_status(self, edit_id: int, status: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE edits SET status = ? WHERE id = ?", (status, edit_id))

    def mark_applied(self, edit_ids: list[int]) -> None:
        """The edits' chunks are written to zarr."""
        with self.tx() as c:
            c.executemany("UPDATE edits SET applied = 1 WHERE id = ?", [(i,) for i in edit_ids])

    def pending_edits(self) -> list[tuple[int, bytes]]:
        """(id, delta) of the edits committed but not written to zarr (after a crash)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT id, delta FROM edits WHERE applied = 0 ORDER BY id"
            ).fetchall()
        return [(r["id"], r["delta"]) for r in rows]

    def edit_by_client_id(self, client_id: str) -> dict[str, Any] | None:
        """id, user_id, chunks (level-0 keys) and status of the edit a client sent."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, user_id, chunks, status FROM edits WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        return None if row is None else {**dict(row), "chunks": json.loads(row["chunks"])}

    def edit_status(self, edit_id: int) -> str | None:
        with self.lock:
            row = self.conn.execute("SELECT status FROM edits WHERE id = ?", (edit_id,)).fetchone()
        return None if row is None else row["status"]

    def edit_delta(self, edit_id: int) -> tuple[int, bytes] | None:
        """(pixels changed, packed delta) of one edit."""
        with self.lock:
            row = self.conn.execute(
                "SELECT pixels, delta FROM edits WHERE id = ?", (edit_id,)
            ).fetchone()
        return None if row is None else (row["pixels"], row["delta"])

    def revert_target(self, user_id: int, op: str) -> int | None:
        """The edit an ``op`` ("undo" or "redo") of the user reverts: for undo their newest
        edit that is no undo and not undone; for redo their newest undo not undone, if no
        drawing edit came after it."""
        with self.lock:  # newest first, from the covering index; stops at the target
            rows = self.conn.execute(
                "SELECT id, op, undone FROM edits INDEXED BY edits_by_user WHERE user_id = ? "
                "ORDER BY id DESC",
                (user_id,),
            )
            for r in rows:
                if op == "undo" and r["op"] != "undo" and not r["undone"]:
                    return r["id"]
                if op == "redo" and r["op"] == "undo" and not r["undone"]:
                    return r["id"]
                if op == "redo" and r["op"] not in ("undo", "redo"):
                    return None
        return None

    def history(self, before: int, limit: int) -> list[dict[str, Any]]:
        """Edits older than id ``before``, newest first, with their authors (no deltas)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT e.id, u.name AS user, e.created, e.op, e.label, e.chunks, e.reverts, "
                "e.undone, e.status FROM edits e JOIN users u ON u.id = e.user_id "
                "WHERE e.id < ? ORDER BY e.id DESC LIMIT ?",
                (before, limit),
            ).fetchall()
        return [
            {**dict(r), "chunks": json.loads(r["chunks"]), "undone": bool(r["undone"])}
            for r in rows
        ]

    # --- review states -----------------------------------------------------------------

    def set_review(
        self,
        ty: int,
        tx: int,
        user_id: int,
        state: str,
        reason: str | None,
        comment: str | None,
        keep_verdicts: bool,
    ) -> None:
        """Set a tile's state, with the seconds since this user leased it (or marked it in
        review), and end its lease unless the state is ``in_review``. ``keep_verdicts``:
        raise ``VerdictTaken`` where an expert's verdict stands."""
        now = time.time()
        with self.tx() as c:
            current = c.execute(
                "SELECT r.state, u.name, u.role FROM review r LEFT JOIN users u "
                "ON u.id = r.user_id WHERE cy = ? AND cx = ?",
                (ty, tx),
            ).fetchone()
            if keep_verdicts and current and current[2] in EXPERTS and current[0] in VERDICTS:
                raise VerdictTaken(current[0], current[1])
            start = c.execute(
                "SELECT started FROM leases WHERE cy = ? AND cx = ? AND user_id = ? UNION ALL "
                "SELECT updated FROM review WHERE cy = ? AND cx = ? AND user_id = ? "
                "AND state = 'in_review'",
                (ty, tx, user_id) * 2,
            ).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO review VALUES (?,?,?,?,?,?,?,?)",
                (
                    ty,
                    tx,
                    state,
                    reason,
                    comment,
                    user_id,
                    now,
                    now - start[0] if start and state != "in_review" else None,
                ),
            )
            if state != "in_review":
                c.execute("DELETE FROM leases WHERE cy = ? AND cx = ?", (ty, tx))

    def review(self, ty: int, tx: int) -> dict[str, Any] | None:
        """state, reason, comment, updated and user of one tile (None: never set)."""
        with self.lock:
            row = self.conn.execute(
                "SELECT r.state, r.reason, r.comment, r.updated, u.name AS user FROM review r "
                "LEFT JOIN users u ON u.id = r.user_id WHERE cy = ? AND cx = ?",
                (ty, tx),
            ).fetchone()
        return None if row is None else dict(row)

    def states(self) -> list[tuple[int, int, str]]:
        """(cy, cx, state) of every tile whose state was set."""
        with self.lock:
            return [tuple(r) for r in self.conn.execute("SELECT cy, cx, state FROM review")]

    def review_seconds(self) -> float:
        """Time reviewers spent on the tiles they decided, in all."""
        with self.lock:
            return self.conn.execute("SELECT TOTAL(seconds) FROM review").fetchone()[0]

    def final_states(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Per tile with a final state: cy, cx, state, reason, comment, updated, seconds,
        user and role."""
        with self.lock:
            return {
                (r["cy"], r["cx"]): dict(r)
                for r in self.conn.execute(
                    "SELECT r.cy, r.cx, r.state, r.reason, r.comment, r.updated, r.seconds, "
                    "u.name AS user, u.role FROM review r LEFT JOIN users u "
                    f"ON u.id = r.user_id WHERE r.state IN {FINAL_STATES}"
                )
            }

    # --- leases ------------------------------------------------------------------------

    def lease(
        self,
        user_id: int,
        pick: Callable[[set[tuple[int, int]], set[tuple[int, int]]], tuple[int, int] | None],
        minutes: float,
    ) -> tuple[tuple[int, int] | None, float, int]:
        """Lease the tile ``pick(taken, done)`` chooses (None: none left) to the user for
        ``minutes``, in one transaction that first drops expired leases and the user's own
        (one lease each). Returns (tile, expiry time, tiles taken or done before)."""
        now = time.time()
        expires = now + 60 * minutes
        with self.tx() as c:
            c.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            c.execute("DELETE FROM leases WHERE user_id = ?", (user_id,))
            taken = {(r[0], r[1]) for r in c.execute("SELECT cy, cx FROM leases")}
            done = {
                (r[0], r[1]) for r in c.execute("SELECT cy, cx FROM review WHERE state != 'unseen'")
            }
            tile = pick(taken, done)
            if tile is not None:
                c.execute("INSERT INTO leases VALUES (?,?,?,?,?)", (*tile, user_id, now, expires))
        return tile, expires, len(taken) + len(done)

    def release(self, ty: int, tx: int, user_id: int) -> bool:
        """End the user's lease of a tile; False if they held none."""
        with self.tx() as c:
            cur = c.execute(
                "DELETE FROM leases WHERE cy = ? AND cx = ? AND user_id = ?", (ty, tx, user_id)
            )
        return cur.rowcount > 0

    # --- stats rows --------------------------------------------------------------------

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The rows of the per-user stats, read together: ``edits`` (user_id, op, status,
        n, px), ``states`` (user_id, state, n) and ``seconds`` (user_id, seconds of each
        final state)."""
        with self.lock:
            c = self.conn
            edits = c.execute(
                "SELECT user_id, op, status, COUNT(*) AS n, SUM(pixels) AS px FROM edits "
                "GROUP BY user_id, op, status"
            ).fetchall()
            states = c.execute(
                "SELECT user_id, state, COUNT(*) AS n FROM review GROUP BY user_id, state"
            ).fetchall()
            seconds = c.execute(
                f"SELECT user_id, seconds FROM review WHERE state IN {FINAL_STATES} "
                "AND seconds IS NOT NULL"
            ).fetchall()
        return {
            "edits": [dict(r) for r in edits],
            "states": [dict(r) for r in states],
            "seconds": [dict(r) for r in seconds],
        }

    def expert_verdicts(self) -> dict[tuple[int, int], str]:
        """(cy, cx) → the name of the expert who gave the tile its final state."""
        with self.lock:
            return {
                (r["cy"], r["cx"]): r["name"]
                for r in self.conn.execute(
                    "SELECT r.cy, r.cx, u.name FROM review r JOIN users u ON u.id = r.user_id "
                    f"WHERE r.state IN {FINAL_STATES} AND u.role IN {EXPERTS}"
                )
            }

    # --- model versions (continuous learning) ---------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Every model version recorded, oldest first: version, parent, created, status, info."""
        with self.lock:
            rows = self.conn.execute("SELECT * FROM models ORDER BY version").fetchall()
        return [{**dict(r), "info": json.loads(r["info"])} for r in rows]

    def put_model(self, version: int, parent: int | None, status: str, info: dict) -> None:
        """Record a model version (or replace its record); a ``served`` one makes the one
        served before ``kept`` (exactly one is served)."""
        if status not in MODEL_STATES:
            raise ValueError(f"model status {status!r}")
        with self.tx() as c:
            if status == "served":
                c.execute("UPDATE models SET status = 'kept' WHERE status = 'served'")
            c.execute(
                "INSERT OR REPLACE INTO models VALUES (?,?,?,?,?)",
                (version, parent, time.time(), status, json.dumps(info)),
            )

    def set_model_status(self, versions: list[int], status: str) -> None:
        with self.tx() as c:
            c.executemany(
                "UPDATE models SET status = ? WHERE version = ?", [(status, v) for v in versions]
            )

    def add_model_update(
        self, version: int, kind: str, tiles: list[tuple[int, int]], user_id: int | None
    ) -> int:
        """Record that ``tiles`` now show ``version``'s predictions; returns the update's id."""
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO model_updates (version, kind, user_id, at, tiles) VALUES (?,?,?,?,?)",
                (version, kind, user_id, time.time(), json.dumps([list(t) for t in tiles])),
            )
        return cur.lastrowid

    def model_updates(self, after: int = 0, last: int = -1) -> list[dict[str, Any]]:
        """Updates with an id above ``after`` (only the ``last`` newest, if ≥ 0), oldest
        first: id, version, kind, user, at, tiles."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT m.id, m.version, m.kind, u.name AS user, m.at, m.tiles "
                "FROM model_updates m LEFT JOIN users u ON u.id = m.user_id "
                "WHERE m.id > ? ORDER BY m.id DESC LIMIT ?",
                (after, last),
            ).fetchall()
        return [{**dict(r), "tiles": json.loads(r["tiles"])} for r in reversed(rows)]


class DeltaReader:
    """One level-0 chunk's part of an edit's delta: ``get(edit_id, key)`` → (idx, before,
    after) or None. Decompresses one blob at a time and keeps the last few (up to
    ``budget`` bytes) for the neighbouring tiles of a large edit."""

    def __init__(self, db: ReviewDB, budget: int = 64 << 20) -> None:
        self.db, self.budget = db, budget
        self._blobs: OrderedDict[int, tuple[int, dict[str, msgspec.Raw]]] = OrderedDict()
        self._bytes = 0

    def get(self, edit_id: int, key: ChunkKey) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        hit = self._blobs.get(edit_id)
        if hit is None:
            with self.db.lock:
                (blob,) = self.db.conn.execute(
                    "SELECT delta FROM edits WHERE id = ?", (edit_id,)
                ).fetchone()
            hit = unpack_lazy(blob)
            self._blobs[edit_id] = hit
            self._bytes += hit[0]
            while self._bytes > self.budget and len(self._blobs) > 1:
                self._bytes -= self._blobs.popitem(last=False)[1][0]
        else:
            self._blobs.move_to_end(edit_id)
        part = hit[1].get(key.short)
        return None if part is None else unpack_part(part)


class _Tx:
    """See ``ReviewDB.tx``."""

    def __init__(self, db: ReviewDB) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        if not self.db.wlock.acquire(timeout=2 * BUSY_S):
            raise Busy("the review database is busy; retry shortly")
        try:
            self.db.wconn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self.db.wlock.release()
            raise translate(exc) from exc
        return self.db.wconn

    def __exit__(self, exc_type, exc, tb) -> None:
        conn = self.db.wconn
        try:
            if exc_type is None:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as error:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise translate(error) from error
            else:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and translate(exc) is not exc:
                    raise translate(exc) from exc
        finally:
            self.db.wlock.release()


def _set_undone(conn: sqlite3.Connection, flag: int, edit_id: int | None) -> None:
    """Mark ``edit_id`` reverted (1) or in effect (0), and the chain it reverts with it:
    reverting an undo puts its edit back in effect (a redo), reverting that redo reverts
    the edit again, and so on down the chain of ``reverts``."""
    while edit_id is not None:
        conn.execute("UPDATE edits SET undone = ? WHERE id = ?", (flag, edit_id))
        (edit_id,) = conn.execute("SELECT reverts FROM edits WHERE id = ?", (edit_id,)).fetchone()
        flag = 1 - flag
