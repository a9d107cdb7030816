"""The write stage: finished shards → the store, on a pool of writer threads.

Each shard is handed to the pool once, whole (zarr shards must have exactly one writer);
the codecs (Blosc/zstd) release the GIL, so shards compress on every core. A writer
writes the shard's layers and per-tile arrays, lists it in the manifest (resume) and
hands its arrays to the pyramid, which builds a parent as soon as its last child is in.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from segloop.io.ome_zarr import OutputStore
from segloop.pipeline.manifest import Manifest
from segloop.pipeline.pyramid import PyramidBuilder
from segloop.pipeline.read import ShardWork
from segloop.pipeline.stages import StageStats
from segloop.pipeline.tiling import Tile
from segloop.pipeline.uncertainty import tile_uncertainty

TileKey = tuple[int, int]  # (ty, tx) level-0 tile = chunk


def tile_key(t: Tile, tile: int) -> TileKey:
    return t.y0 // tile, t.x0 // tile


class ShardWriter:
    """Writes finished ``ShardWork`` items on ``workers`` threads (at most 2 × workers
    shards queued). A full run (``select`` None) writes every layer the store holds; with
    a ``manifest`` it lists each shard there and builds the pyramid as it goes.
    Re-segmenting ``select`` tiles pastes them over the shard's current labels and
    confidence. Written level-0 shards are collected in ``rewritten``; ``stats`` sums the
    writers' busy time (so it may exceed the wall time)."""

    def __init__(
        self,
        store: OutputStore,
        progress: Callable[[int], None],
        model_version: int,
        manifest: Manifest | None = None,
        select: set[TileKey] | None = None,
        workers: int | None = None,
    ) -> None:
        self.store, self.grid, self.manifest = store, store.grid, manifest
        self.pyramid = PyramidBuilder(store, manifest) if manifest is not None else None
        self.progress, self.model_version, self.select = progress, model_version, select
        self.versions = None if select is None else store.read_tiles("model_version")
        self.rewritten: set[tuple[int, int]] = set()
        self.stats = StageStats("write")
        self.workers = workers or len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="segloop-write")
        self._slots = threading.Semaphore(2 * self.workers)
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []

    def buffers(self, work: ShardWork) -> None:
        """Give ``work`` its label and confidence buffers (the stored ones when only some
        tiles are re-segmented)."""
        y0, y1, x0, x1 = work.box
        if self.select is None:
            work.labels = np.zeros((y1 - y0, x1 - x0), np.uint8)
            work.confidence = np.zeros((y1 - y0, x1 - x0), np.uint8)
        else:
            work.labels = self.store.read("segmentation", 0, work.box)
            work.confidence = self.store.read("confidence", 0, work.box)

    def __call__(self, work: ShardWork) -> list:
        """Stage function: queue ``work`` for a writer thread (blocks while 2 × workers
        shards wait)."""
        self._raise()
        self._slots.acquire()
        self._pool.submit(self._write, work).add_done_callback(self._done)
        return []

    def _done(self, fut: Future) -> None:
        self._slots.release()
        if fut.exception() is not None:
            with self._lock:
                self._errors.append(fut.exception())

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Wait for every queued shard; re-raise the first writer error."""
        self._pool.shutdown(wait=True)
        self._raise()

    def _write(self, work: ShardWork) -> None:
        t0 = time.perf_counter()
        key, box = work.key, work.box
        layers = {"segmentation": work.labels, "confidence": work.confidence}
        if self.select is None and "image" in self.store.layers:
            layers = {"image": work.image, **layers}
        for layer, data in layers.items():
            self.store.write(layer, 0, box, data)
        doubt = work.uncertainty
        if doubt is None:
            doubt = tile_uncertainty(work.confidence, self.grid.tile)
        self.store.write_tiles("uncertainty", *key, doubt)
        per = self.grid.shard // self.grid.tile
        if self.versions is None:
            versions = np.full(doubt.shape, self.model_version, np.uint16)
        else:
            with self._lock:
                for t in self.grid.tiles(*key):
                    if tile_key(t, self.grid.tile) in self.select:
                        self.versions[tile_key(t, self.grid.tile)] = self.model_version
                versions = self.versions[
                    key[0] * per : (key[0] + 1) * per, key[1] * per : (key[1] + 1) * per
                ].copy()
        self.store.write_tiles("model_version", *key, versions)
        with self._lock:
            self.rewritten.add(key)
        if self.manifest is not None:
            self.manifest.add((0, *key))
            self.pyramid.shard_done((0, *key), layers)
        y0, y1, x0, x1 = box
        with self._lock:
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.items += 1
            self.progress(
                (y1 - y0) * (x1 - x0)
                if self.select is None
                else sum(
                    t.h * t.w
                    for t in self.grid.tiles(*key)
                    if tile_key(t, self.grid.tile) in self.select
                )
            )
