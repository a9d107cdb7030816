"""Segmentation chunks in memory, written to zarr behind the edit's acknowledgement.

An edit is durable once its delta is committed to SQLite (``review.db``); writing the
zarr shards is then only materialisation. The writer thread computes the new chunks (level
0 and the pyramid above) here, in memory, so the next edit and every tile read see them at
once, and a flusher thread rewrites the touched shards in commit order and marks the edits
applied. A crash before that loses nothing: the server replays committed edits that are
not marked applied when it starts.

Chunks are (h, w) uint8 read-only arrays, keyed (level, cy, cx). Clean chunks are kept
up to ``budget`` bytes (least recently used go first); dirty ones stay until flushed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

Key = tuple[int, int, int]  # level, cy, cx


class ChunkCache:
    """``read(key)`` → chunk from zarr (caller locks the shard); ``write(level, chunks)``
    writes {key: chunk} of one level to zarr; ``applied(edit_ids)`` marks edits done."""

    def __init__(
        self,
        read: Callable[[Key], np.ndarray],
        write: Callable[[int, dict[Key, np.ndarray]], None],
        applied: Callable[[list[int]], None],
        budget: int = 256 << 20,
    ) -> None:
        self._read, self._write, self._applied = read, write, applied
        self.budget = budget
        self._chunks: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._dirty: set[Key] = set()
        self._pending: list[tuple[int, list[Key]]] = []  # (edit id, keys) to flush
        self._puts: dict[Key, int] = {}  # puts per key: a read racing a put is not kept
        self._lock = threading.Lock()
        self._bytes = 0
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="segloop-flush")
        self._last: Future | None = None

    def get(self, key: Key) -> np.ndarray:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
                return chunk
            puts = self._puts.get(key, 0)
        chunk = self._read(key)
        chunk.setflags(write=False)
        with self._lock:
            if key in self._chunks:  # put meanwhile: that one is newer
                return self._chunks[key]
            if self._puts.get(key, 0) == puts:  # else put, flushed and evicted meanwhile
                self._insert(key, chunk)
            return chunk

    def put(self, edit_id: int, chunks: dict[Key, np.ndarray]) -> None:
        """New contents of ``chunks`` (from edit ``edit_id``): visible now, flushed later."""
        with self._lock:
            for key, chunk in chunks.items():
                chunk.setflags(write=False)
                self._insert(key, chunk)
                self._dirty.add(key)
                self._puts[key] = self._puts.get(key, 0) + 1
            self._pending.append((edit_id, list(chunks)))
            self._last = self._flusher.submit(self._flush)

    def _insert(self, key: Key, chunk: np.ndarray) -> None:
        old = self._chunks.pop(key, None)
        self._bytes += chunk.nbytes - (old.nbytes if old is not None else 0)
        self._chunks[key] = chunk
        while self._bytes > self.budget:
            victim = next((k for k in self._chunks if k not in self._dirty), None)
            if victim is None:
                break
            self._bytes -= self._chunks.pop(victim).nbytes

    def _flush(self) -> None:
        """Write every dirty chunk (coalescing the edits queued so far), level by level."""
        with self._lock:
            jobs, self._pending = self._pending, []
            keys = {k for _, ks in jobs for k in ks}
            snapshot = {k: self._chunks[k] for k in keys if k in self._dirty}
        if not jobs:
            return
        try:
            for level in sorted({k[0] for k in snapshot}):
                self._write(level, {k: c for k, c in snapshot.items() if k[0] == level})
        except BaseException:
            with self._lock:  # retried by the next flush; a restart replays them anyway
                self._pending[:0] = jobs
            raise
        with self._lock:  # clean unless an edit replaced the chunk while it was written
            self._dirty -= {k for k, c in snapshot.items() if self._chunks.get(k) is c}
        self._applied([edit_id for edit_id, _ in jobs])

    def drain(self) -> None:
        """Block until everything put so far is in zarr (raises what a flush raised)."""
        with self._lock:
            last = self._last
        if last is not None:
            last.result()

    def close(self) -> None:
        """Flush what is left (retrying a failed flush once more), then stop."""
        with self._lock:
            self._last = self._flusher.submit(self._flush)
        try:
            self.drain()
        finally:
            self._flusher.shutdown(wait=True)
