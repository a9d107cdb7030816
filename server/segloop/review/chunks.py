"""Segmentation chunks in memory, written to zarr behind the edit's acknowledgement.

An edit is durable once its delta is committed to SQLite (``review.db``); writing the
zarr shards is then only materialisation. The writer thread computes the new chunks (level
0 and the pyramid above) here, in memory, so the next edit and every tile read see them at
once, and a flusher thread rewrites the touched shards and marks the edits applied. It
flushes in the gaps between edits (``idle`` s after the last one, at most ``delay`` s
after the first unflushed one), so a stroke drawn right after another does not share the
cores with the previous one's shard writes, and a burst costs one rewrite per shard. A
crash before that loses nothing: the server replays committed edits that are not marked
applied when it starts.

Chunks are (h, w) uint8 read-only arrays, keyed (level, cy, cx). Clean chunks are kept
up to ``budget`` bytes (least recently used go first); dirty ones stay until flushed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class ChunkKey(NamedTuple):
    """One label chunk: (level, cy, cx). Its text form is "level/cy/cx" (``str``); the
    level-0 form "cy/cx" (``short``: edits' chunk lists and deltas in the database, an
    edit's ``base``) parses too."""

    level: int
    cy: int
    cx: int

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """ "level/cy/cx" or "cy/cx" (level 0) → the key; ``ValueError`` otherwise."""
        parts = text.split("/")
        if len(parts) == 2:
            parts.insert(0, "0")
        if len(parts) != 3 or not all(p.isdigit() and len(p) < 9 for p in parts):
            raise ValueError(f'a chunk key is "level/cy/cx" or "cy/cx", got {text!r}')
        return cls(*map(int, parts))

    def __str__(self) -> str:
        return f"{self.level}/{self.cy}/{self.cx}"

    @property
    def short(self) -> str:
        """The level-0 form "cy/cx"."""
        assert self.level == 0, self
        return f"{self.cy}/{self.cx}"

    @property
    def yx(self) -> tuple[int, int]:
        return self.cy, self.cx


log = logging.getLogger("segloop.review")


class ChunkCache:
    """``read(key)`` → chunk from zarr (caller locks the shard); ``write(level, chunks)``
    writes {key: chunk} of one level to zarr; ``applied(edit_ids)`` marks edits done."""

    def __init__(
        self,
        read: Callable[[ChunkKey], np.ndarray],
        write: Callable[[int, dict[ChunkKey, np.ndarray]], None],
        applied: Callable[[list[int]], None],
        budget: int = 256 << 20,
        idle: float = 0.05,
        delay: float = 1.0,
    ) -> None:
        self._read, self._write, self._applied = read, write, applied
        self.budget, self.idle, self.delay = budget, idle, delay
        self._chunks: OrderedDict[ChunkKey, np.ndarray] = OrderedDict()
        self._dirty: set[ChunkKey] = set()
        self._pending: list[tuple[int, list[ChunkKey]]] = []  # (edit id, keys) to flush
        self._puts: dict[ChunkKey, int] = {}  # puts per key: a read racing a put is not kept
        self._bytes = 0
        self._cv = threading.Condition()
        self._last_put = self._first_put = 0.0
        self._put_count = self._flushed_count = 0  # edits put / edits flushed so far
        self._urgent = self._closing = False
        self._error: BaseException | None = None  # of the last flush, until drain raises it
        self._flusher = threading.Thread(target=self._run, name="segloop-flush", daemon=True)
        self._flusher.start()

    def get(self, key: ChunkKey) -> np.ndarray:
        with self._cv:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
                return chunk
            puts = self._puts.get(key, 0)
        chunk = self._read(key)
        chunk.setflags(write=False)
        with self._cv:
            if key in self._chunks:  # put meanwhile: that one is newer
                return self._chunks[key]
            if self._puts.get(key, 0) == puts:  # else put, flushed and evicted meanwhile
                self._insert(key, chunk)
            return chunk

    def put(self, edit_id: int | None, chunks: dict[ChunkKey, np.ndarray]) -> None:
        """New contents of ``chunks`` (from edit ``edit_id``; None: not an edit, e.g. a new
        model's predictions): visible now, flushed later."""
        with self._cv:
            for key, chunk in chunks.items():
                chunk.setflags(write=False)
                self._insert(key, chunk)
                self._dirty.add(key)
                self._puts[key] = self._puts.get(key, 0) + 1
            now = time.monotonic()
            if not self._pending:
                self._first_put = now
            self._last_put = now
            self._pending.append((edit_id, list(chunks)))
            self._put_count += 1
            self._error = None  # a failed flush is tried again with this edit
            self._cv.notify_all()

    def _insert(self, key: ChunkKey, chunk: np.ndarray) -> None:
        old = self._chunks.pop(key, None)
        self._bytes += chunk.nbytes - (old.nbytes if old is not None else 0)
        self._chunks[key] = chunk
        while self._bytes > self.budget:
            victim = next((k for k in self._chunks if k not in self._dirty), None)
            if victim is None:
                break
            self._bytes -= self._chunks.pop(victim).nbytes

    def _due(self) -> float:
        """Seconds until the pending edits should be flushed (≤ 0: now). Caller locks."""
        if self._urgent or self._closing:
            return 0.0
        now = time.monotonic()
        return min(self._last_put + self.idle, self._first_put + self.delay) - now

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._pending and self._error is None and self._due() <= 0):
                    if self._closing and (not self._pending or self._error is not None):
                        return
                    wait = self._due() if self._pending and self._error is None else None
                    self._cv.wait(wait)
                jobs, self._pending = self._pending, []
                keys = {k for _, ks in jobs for k in ks}
                snapshot = {k: self._chunks[k] for k in keys if k in self._dirty}
            try:
                for level in sorted({k[0] for k in snapshot}):
                    self._write(level, {k: c for k, c in snapshot.items() if k[0] == level})
                self._applied([edit_id for edit_id, _ in jobs if edit_id is not None])
            except BaseException as exc:  # kept for the next put or drain; a restart replays
                log.exception("writing %d edits to zarr failed; they stay pending", len(jobs))
                with self._cv:
                    self._pending[:0] = jobs
                    self._error = exc
                    self._cv.notify_all()
                continue
            with self._cv:  # clean unless an edit replaced the chunk while it was written
                self._dirty -= {k for k, c in snapshot.items() if self._chunks.get(k) is c}
                self._flushed_count += len(jobs)
                if self._flushed_count >= self._put_count:
                    self._urgent = False
                self._cv.notify_all()

    def drain(self) -> None:
        """Flush now and block until everything put so far is in zarr. Raises what the last
        flush raised (its edits stay pending: the next put or drain tries again)."""
        with self._cv:
            target = self._put_count
            if self._error is not None and self._pending:  # a failed flush: try once more
                self._error = None
            self._urgent = True
            self._cv.notify_all()
            while self._flushed_count < target and self._error is None:
                self._cv.wait()
            if self._error is not None:
                error, self._error = self._error, None
                self._urgent = False
                raise error

    def close(self) -> None:
        """Flush what is left (retrying a failed flush once more), then stop."""
        try:
            self.drain()
        finally:
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._flusher.join()
