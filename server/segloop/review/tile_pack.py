"""Tiles encoded once and kept in the user's cache folder (``pack_path``).

The image and confidence layers never change under review, and segmentation chunks change
only where someone edits, so every tile as the store was segmented (version 0) is encoded
once — image in WebP and JPEG (unless the source's own JPEG tiles are passed through),
labels and confidence in PNG — by a background thread that
``segloop serve`` starts, coarsest level first (what a viewer asks for first), pausing
while requests wait for tiles encoded on demand (a lower OS priority instead would let it
be descheduled while holding the GIL, stalling the server behind it). They are kept in an
SQLite file, one row per tile and format (the layout of MBTiles), so a restarted server
answers them without decoding anything; edited chunks are encoded on demand. The file
lives in ``$SEGLOOP_CACHE`` (default ``$XDG_CACHE_HOME/segloop`` or
``~/.cache/segloop``) under ``tile-packs/``, named after the store's resolved path: a
cache, so the store costs only what it holds (an old store's ``review-tiles.sqlite`` is
deleted at start). A pack made under other store parameters (``ReviewImage.tag``: a
re-segmented store) is emptied and built again. Deleting the file is always safe.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from segloop.review.check import DamagedChunk

#: where older versions kept the pack: inside the store (deleted at start)
LEGACY_NAME = "review-tiles.sqlite"
CACHE_ENV = "SEGLOOP_CACHE"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tiles (
    level INTEGER NOT NULL, ty INTEGER NOT NULL, tx INTEGER NOT NULL,
    layer TEXT NOT NULL, fmt TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (level, ty, tx, layer, fmt)
) WITHOUT ROWID;
"""

TileKey = tuple[int, int, int]  # level, ty, tx
#: a tile position in every packed (layer, format): (level, ty, tx) → {(layer, fmt): bytes}
Render = Callable[[int, int, int], dict[tuple[str, str], bytes]]


def cache_dir() -> Path:
    """``$SEGLOOP_CACHE``, else ``$XDG_CACHE_HOME/segloop``, else ``~/.cache/segloop``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segloop"


def pack_path(store: Path) -> Path:
    """The tile pack of ``store``: ``<cache>/tile-packs/<name>-<hash of its path>.sqlite``
    (a copied or moved store gets its own)."""
    where = str(store.resolve())
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    return cache_dir() / "tile-packs" / f"{store.name.removesuffix('.zarr')}-{digest}.sqlite"


def remove_legacy(store: Path) -> bool:
    """Delete a pack an older segloop left inside the store; True if there was one."""
    found = False
    for suffix in ("", "-wal", "-shm"):
        p = store / (LEGACY_NAME + suffix)
        if p.exists():
            p.unlink()
            found = True
    return found


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last rows is harmless
    return conn


class TilePack:
    """``get`` from any thread; ``start`` builds the missing tiles in the background."""

    def __init__(
        self,
        path: Path,
        tag: str,
        tiles: list[TileKey],
        formats: int | Callable[[TileKey], int],
    ):
        """``path``: the SQLite file (its folder is made); ``formats``: how many (layer,
        format) rows one tile position has when done (or a function of the position)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        count = formats if callable(formats) else (lambda key: formats)
        self.tiles = sorted(tiles, key=lambda t: (-t[0], t[1], t[2]))  # coarsest level first
        self._conn = _connect(self.path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'tag'").fetchone()
            if row is None or row[0] != tag:
                self._conn.execute("DELETE FROM tiles")
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('tag', ?)", (tag,))
            have = self._conn.execute(
                "SELECT level, ty, tx, count(*) FROM tiles GROUP BY level, ty, tx"
            ).fetchall()
        self._done = {(lv, ty, tx) for lv, ty, tx, n in have if n == count((lv, ty, tx))}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def progress(self) -> dict[str, int]:
        return {"tiles": len(self._done), "of": len(self.tiles)}

    def get(self, layer: str, level: int, ty: int, tx: int, fmt: str) -> bytes | None:
        if (level, ty, tx) not in self._done:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT data FROM tiles WHERE level = ? AND ty = ? AND tx = ? AND layer = ?"
                " AND fmt = ?",
                (level, ty, tx, layer, fmt),
            ).fetchone()
        return None if row is None else row[0]

    def start(self, render: Render, busy: Callable[[], bool] = lambda: False) -> None:
        """Build the missing tiles in a thread; it waits while ``busy()`` is true."""
        if len(self._done) < len(self.tiles):
            self._thread = threading.Thread(
                target=self._build, args=(render, busy), name="segloop-tile-pack", daemon=True
            )
            self._thread.start()

    def _build(self, render: Render, busy: Callable[[], bool], batch: int = 16) -> None:
        """Render ``batch`` positions at a time on every core (the encoders release the
        GIL), waiting before each while ``busy()``; one transaction per batch."""

        def one(key: TileKey) -> list[tuple]:
            while busy() and not self._stop.is_set():
                self._stop.wait(0.01)
            if self._stop.is_set():
                return []
            try:
                return [(*key, *lf, data) for lf, data in render(*key).items()]
            except DamagedChunk:  # left out: served live, where it answers its clear error
                return []

        conn = _connect(self.path)
        workers = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="segloop-pack")
        try:
            todo = [t for t in self.tiles if t not in self._done]
            for i in range(0, len(todo), batch):
                keys = todo[i : i + batch]
                rows = [r for rs in workers.map(one, keys) for r in rs]
                if self._stop.is_set():
                    return
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO tiles VALUES (?,?,?,?,?,?)", rows)
                conn.execute("COMMIT")
                self._done.update(keys)
        finally:
            workers.shutdown(wait=True)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._conn.close()
