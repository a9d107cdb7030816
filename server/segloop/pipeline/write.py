"""The write stage: finished shards → the store, on a pool of writers.

Each shard is handed to the pool once, as one task (zarr shards must have exactly one
writer: each shard of each array has one): its layers and per-tile arrays go to zarr in
one call, written concurrently there (``OutputStore.put``; one task per layer, each
layer its own call, was 2.7 vs 1.8 busy s summed, 1.3 vs 1.25 s with any write running,
8192² zero-cost model, 2 cores). The task returns the shard's quarter (downsampled once);
then the shard is listed in the manifest (resume) and the pyramid writes a parent as
soon as its last child is in, the same way.

Two pools: **threads**, or **processes** for big jobs on many cores. The processes were
chosen when zarr-python's per-chunk asyncio bookkeeping, holding the GIL on one event-loop
thread per process, was most of a write (two writer threads wrote 16 shards no faster than
one). The writer's arrays now encode in zarrs (``io/ome_zarr.py``), off the GIL: 16 shards
of 2048² took 0.40–0.49 s on two threads vs 0.52–0.71 s on one (2 cores); whether threads
now match processes on ≥ 4 cores is not measured, so the rule below stays.
A process gets the shard's arrays pickled (≈ 2 bytes per pixel, plus
the image when the store copies it). On 2 cores threads won in the pipeline (8192²,
zero-cost model: 13–15.5 vs 9–10 Mpx/s), since decode, pre and post release the GIL
while two more processes only compete for the cores.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import psutil

from segloop.io.ome_zarr import OutputStore
from segloop.pipeline.manifest import Manifest
from segloop.pipeline.pyramid import Box, PyramidBuilder, Quarter, write_level_local
from segloop.pipeline.read import ShardWork
from segloop.pipeline.stages import StageStats
from segloop.pipeline.uncertainty import tile_uncertainty
from segloop.tiling import Tile, TileGrid

TileKey = tuple[int, int]  # (ty, tx) level-0 tile = chunk
Span = tuple[float, float]  # (start, end) of a write task, time.perf_counter() seconds
#: writer processes (instead of threads) for jobs of at least this many shards on hosts of
#: at least this many cores: on 2 cores threads measured faster (the pipeline's other
#: stages release the GIL; two more processes only compete for the cores)
PROCESS_SHARDS, PROCESS_CORES = 8, 4

_STORE: OutputStore | None = None  # a writer process's own handle on the store


def tile_key(t: Tile, tile: int) -> TileKey:
    return t.y0 // tile, t.x0 // tile


def _open_in_process(where: str, grid: TileGrid, channels: int, dtype: str, owner: int) -> None:
    """A writer process's start: its own store handle, and an exit when the job dies."""
    global _STORE
    _STORE = OutputStore(where, grid, channels, np.dtype(dtype))
    _exit_with(owner)


def _exit_with(owner: int) -> None:
    """End this process when the job's process ``owner`` is gone. A job killed by SIGKILL
    closes no pipe of the pool (every worker holds both ends of its result queue), so a
    worker sending a result blocked forever, and it and the forkserver stayed (seen after
    the resume-after-SIGKILL tests: 350 MB left behind per killed job)."""
    try:
        job = psutil.Process(owner)
    except psutil.NoSuchProcess:
        os._exit(1)

    def watch() -> None:
        while job.is_running():  # is_running also tells a reused pid apart
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="segloop-owner", daemon=True).start()


def _timed_write(
    level: int,
    box: Box,
    arrays: dict[str, np.ndarray],
    tiles: tuple[tuple[int, int], np.ndarray, np.ndarray | None, np.ndarray] | None = None,
    store: OutputStore | None = None,
) -> tuple[Quarter | None, Span]:
    """Write one shard's ``arrays`` (layer → data) at ``level`` (on ``store``; None: this
    writer process's own) and, with ``tiles`` = (key, versions, uncertainty or None,
    confidence), its per-tile arrays, all in one call; its quarter (None at the top
    level) and when it ran."""
    t0 = time.perf_counter()
    store = store or _STORE
    extra = []
    if tiles is not None:
        key, versions, doubt, confidence = tiles
        if doubt is None:
            doubt = tile_uncertainty(confidence, store.grid.tile)
        extra = [
            store.tiles_part("uncertainty", *key, doubt),
            store.tiles_part("model_version", *key, versions),
        ]
    quarter = write_level_local(store, level, box, arrays, *extra)
    return quarter, (t0, time.perf_counter())


class ShardWriter:
    """Writes finished ``ShardWork`` items on ``workers`` threads or processes (at most
    2 × workers shards queued). A full run (``select`` None) writes every layer the store
    holds; with a ``manifest`` it lists each shard there and builds the pyramid as it
    goes. Re-segmenting ``select`` tiles pastes them over the shard's current labels and
    confidence. Written level-0 shards are collected in ``rewritten``; ``stats`` sums the
    writers' busy time (so it may exceed the wall time).

    processes: None = processes for jobs of ≥ ``PROCESS_SHARDS`` shards (``expect``) with
    ≥ ``PROCESS_CORES`` writers and cores.
    """

    def __init__(
        self,
        store: OutputStore,
        progress: Callable[[int], None],
        model_version: int,
        manifest: Manifest | None = None,
        select: set[TileKey] | None = None,
        workers: int | None = None,
        processes: bool | None = None,
        expect: int = 0,
    ) -> None:
        self.store, self.grid, self.manifest = store, store.grid, manifest
        self.progress, self.model_version, self.select = progress, model_version, select
        self.versions = None if select is None else store.read_tiles("model_version")
        self.rewritten: set[tuple[int, int]] = set()
        self.stats = StageStats("write")
        self.workers = workers or len(os.sched_getaffinity(0))
        if processes is None:
            cores = len(os.sched_getaffinity(0))
            processes = expect >= PROCESS_SHARDS and min(cores, self.workers) >= PROCESS_CORES
        self.processes = processes
        self._pool: Executor
        if processes:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_open_in_process,
                initargs=(
                    str(store.path),
                    store.grid,
                    store.channels,
                    store.dtype.str,
                    os.getpid(),
                ),
            )
        else:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="segloop-write")
        self.pyramid = (
            PyramidBuilder(store, manifest, self._write_level) if manifest is not None else None
        )
        self._slots = threading.Semaphore(2 * self.workers)
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._spans: list[Span] = []
        self._done: queue.Queue = queue.Queue()
        self._finisher = threading.Thread(
            target=self._finish_loop, name="segloop-finish", daemon=True
        )
        self._finisher.start()

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
        """Stage function: queue ``work`` for the writers, one task (its layers and
        per-tile arrays); blocks while 2 × workers shards wait."""
        self._raise()
        arrays = {"segmentation": work.labels, "confidence": work.confidence}
        if self.select is None and "image" in self.store.layers:
            arrays = {"image": np.ascontiguousarray(work.image), **arrays}
        tiles = (work.key, self._versions(work), work.uncertainty, work.confidence)
        self._slots.acquire()
        store = None if self.processes else self.store  # a process has its own handle
        fut = self._pool.submit(_timed_write, 0, work.box, arrays, tiles, store)
        # the callback holds the shard, not the future: no reference cycle keeps the
        # shard's buffers (only the cyclic collector would free one, rarely after gc.freeze)
        fut.add_done_callback(lambda f: self._done.put((work, f)))
        return []

    def _write_level(self, level: int, box: Box, arrays: dict[str, np.ndarray]) -> Quarter | None:
        """A pyramid parent, its layers in one task on the pool; its quarter."""
        store = None if self.processes else self.store
        quarter, span = self._pool.submit(_timed_write, level, box, arrays, None, store).result()
        with self._lock:
            self._spans.append(span)
        return quarter

    def _versions(self, work: ShardWork) -> np.ndarray:
        """The shard's per-tile model versions (uint16, tiles down × across)."""
        key, per = work.key, self.grid.shard // self.grid.tile
        if self.versions is None:
            y0, y1, x0, x1 = work.box
            shape = (-(-(y1 - y0) // self.grid.tile), -(-(x1 - x0) // self.grid.tile))
            return np.full(shape, self.model_version, np.uint16)
        for t in self.grid.tiles(*key):
            if tile_key(t, self.grid.tile) in self.select:
                self.versions[tile_key(t, self.grid.tile)] = self.model_version
        return self.versions[
            key[0] * per : (key[0] + 1) * per, key[1] * per : (key[1] + 1) * per
        ].copy()

    def _finish_loop(self) -> None:
        """After each shard's writes: manifest, pyramid, progress (one thread: the
        pyramid's parent writes wait on the pool, which a pool callback must never do)."""
        while (item := self._done.get()) is not None:
            work, fut = item
            try:
                quarter, (t0, t1) = fut.result()
                with self._lock:
                    self._spans.append((t0, t1))
                self._finished(work, quarter, t1 - t0)
            except BaseException as exc:
                with self._lock:
                    self._errors.append(exc)
            finally:
                del item, work, fut  # the shard's buffers go now, not at the next shard
                self._slots.release()

    def _finished(self, work: ShardWork, quarter: Quarter | None, busy: float) -> None:
        key = work.key
        self.rewritten.add(key)
        t0 = time.perf_counter()
        if self.manifest is not None:
            self.manifest.add((0, *key))
            self.pyramid.shard_done((0, *key), quarter)
        y0, y1, x0, x1 = work.box
        self.stats.busy_s += busy + time.perf_counter() - t0
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

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Wait for every queued shard and the pyramid above them; re-raise the first
        writer error."""
        try:
            for _ in range(2 * self.workers):  # every queued write has been finished
                self._slots.acquire()
            self._done.put(None)
            self._finisher.join()
        finally:
            self._pool.shutdown(wait=True)
        self._raise()

    def describe(self) -> dict[str, Any]:
        """Pool shape, and ``busy_any_s``: seconds during which at least one write task ran
        (``busy_s`` sums the tasks, so overlapping writers count twice there); the most
        pyramid quarters held at once."""
        return {
            "workers": self.workers,
            "processes": self.processes,
            "busy_any_s": round(_union(self._spans), 3),
            "peak_quarters": self.pyramid.peak_quarters if self.pyramid else 0,
        }


def _union(spans: list[Span]) -> float:
    """Total length of the union of ``spans`` (seconds)."""
    total, end = 0.0, -np.inf
    for t0, t1 in sorted(spans):
        total += max(0.0, t1 - max(t0, end))
        end = max(end, t1)
    return total
