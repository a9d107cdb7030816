"""The read stage: source regions for the shards of a job, each stored chunk decoded once.

A shard's windows need the shard plus a halo, so neighbouring shards overlap by 2 × halo;
read naively, the source chunks under those overlaps are decoded again for every shard
that touches them (≈ 2.25× the image for 512² source tiles and 2048² shards).
``BlockCache`` notes upfront which shard reads need each block (a whole number of
source chunks), decodes a block on first use, and after each read keeps only the part of
it that reads still to come need (for the next row of shards: the halo rows), dropping it
after its last. A kept part next needed more than ``spill_after`` reads later (at a band
boundary of ``TileGrid.shard_order``: a block row as wide as the image, needed again a
band later) waits in an unlinked temporary file instead (``SpillFile``), so memory does
not grow with the image's width; the page cache holds it, reclaimable.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from segloop.errors import UserError
from segloop.io.source import ImageSource
from segloop.pipeline.stages import StageStats
from segloop.tiling import SHARD_BAND, TileGrid, Window

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), level-0 pixels
#: smallest cache block side (px): tiny source tiles or strips are decoded in groups
MIN_BLOCK = 256
#: reads ahead beyond which a kept part is spilled: two ``shard_order`` squares of shards,
#: so only band-boundary parts of an image wider than two squares go to disk
SPILL_AFTER = 2 * SHARD_BAND**2


class SpillFile:
    """Arrays parked in one unlinked temporary file (``$TMPDIR``), its space reused by
    size: holds at most what is parked at once. Thread-safe; gone when the job ends."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._end = 0
        self._free: dict[int, list[int]] = {}  # bytes → free offsets of that size
        self._lock = threading.Lock()
        self.parked = 0  # parts written, over the job
        self.peak_bytes = 0  # most bytes parked at once
        self._bytes = 0

    def put(self, a: np.ndarray) -> tuple[int, tuple[int, ...], np.dtype]:
        """Park ``a``; returns its handle for ``take``."""
        n = a.nbytes
        with self._lock:
            if self._file is None:
                try:
                    self._file = tempfile.TemporaryFile(prefix="segloop-spill-")  # noqa: SIM115
                except OSError as exc:
                    raise _spill_error(exc) from exc
            free = self._free.get(n)
            if free:
                offset = free.pop()
            else:
                offset, self._end = self._end, self._end + n
            self.parked += 1
            self._bytes += n
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            fd = self._file.fileno()
        try:
            os.pwrite(fd, np.ascontiguousarray(a).data, offset)
        except OSError as exc:
            raise _spill_error(exc) from exc
        return offset, a.shape, a.dtype

    def take(self, handle: tuple[int, tuple[int, ...], np.dtype]) -> np.ndarray:
        """The array parked as ``handle``; its space is free again."""
        offset, shape, dtype = handle
        out = np.empty(shape, dtype)
        assert self._file is not None
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = os.preadv(self._file.fileno(), [view], offset)
        if got != out.nbytes:
            raise OSError(f"spill file: read {got} of {out.nbytes} bytes at {offset}")
        self.free(handle)
        return out

    def free(self, handle: tuple[int, tuple[int, ...], np.dtype]) -> None:
        """Give the space of ``handle`` back (``take`` does it)."""
        offset, shape, dtype = handle
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with self._lock:
            self._free.setdefault(n, []).append(offset)
            self._bytes -= n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _spill_error(exc: OSError) -> UserError:
    return UserError(
        f"cannot keep decoded rows in the temporary folder {tempfile.gettempdir()}: "
        f"{exc.strerror or exc}; free space there or set TMPDIR to a folder with room, "
        "and run the same command to resume"
    )


class BlockCache:
    """Region reads over ``src`` in which each stored chunk is decoded at most once for the
    reads announced in ``boxes`` (the job's read boxes, in any order).

    ``decodes`` counts decodes per source chunk (``(chunk row, chunk col)``); a job that
    reads only announced boxes leaves every count at 1. ``boxes`` come in the order they
    will be read: a kept part next needed more than ``spill_after`` reads after the
    furthest read so far is parked in ``spill`` (None: never).
    """

    def __init__(
        self, src: ImageSource, boxes: Iterable[Box], spill_after: int | None = SPILL_AFTER
    ) -> None:
        self.src = src
        self.spill_after = spill_after
        self.spill = SpillFile()
        self._order: dict[Box, int] = {}  # box → its place in the read order
        self._at = -1  # the furthest box read so far, in that order
        self._parked: dict[tuple[int, int], tuple[int, int, tuple]] = {}  # (y0, x0, handle)
        self.decodes: Counter[tuple[int, int]] = Counter()
        self.peak_blocks = 0  # most blocks held at once
        self.peak_bytes = 0  # most decoded bytes held at once
        self._bytes: dict[tuple[int, int], int] = {}  # per block held, and their sum:
        self._held_bytes = 0
        chunk = src.block_shape
        self.chunk = chunk
        if chunk is None:  # in memory: nothing to cache
            self.block = None
            return
        self.block = tuple(c * -(-MIN_BLOCK // c) for c in chunk)
        #: per block, the announced reads that still need it
        self._pending: dict[tuple[int, int], list[Box]] = {}
        for i, b in enumerate(boxes):
            self._order.setdefault(b, i)
            for key in self._blocks(b):
                self._pending.setdefault(key, []).append(b)
        #: per block, a future of (y0, x0, pixels): what is kept of it, at that origin
        self._cached: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()

    def _blocks(self, box: Box) -> list[tuple[int, int]]:
        bh, bw = self.block
        y0, y1, x0, x1 = box
        return [
            (by, bx) for by in range(y0 // bh, -(-y1 // bh)) for bx in range(x0 // bw, -(-x1 // bw))
        ]

    def _decode(self, key: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        with self._lock:
            parked = self._parked.pop(key, None)
        if parked is not None:  # decoded before, kept in the spill file
            return parked[0], parked[1], self.spill.take(parked[2])
        (bh, bw), (ch, cw) = self.block, self.chunk
        y0, x0 = key[0] * bh, key[1] * bw
        y1, x1 = min(self.src.height, y0 + bh), min(self.src.width, x0 + bw)
        data = self.src.read(y0, y1, x0, x1)
        with self._lock:
            self.decodes.update(
                (cy, cx)
                for cy in range(y0 // ch, -(-y1 // ch))
                for cx in range(x0 // cw, -(-x1 // cw))
            )
        return y0, x0, data

    def _get(self, key: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        with self._lock:
            fut = self._cached.get(key)
            mine = fut is None
            if mine:
                fut = self._cached[key] = Future()
                self.peak_blocks = max(self.peak_blocks, len(self._cached))
        if mine:
            try:
                fut.set_result(self._decode(key))
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                with self._lock:
                    self._account(key, fut.result()[2].nbytes)
        return fut.result()

    def _account(self, key: tuple[int, int], nbytes: int) -> None:
        """Block ``key`` holds ``nbytes`` now (decoded, or cut down); the lock is held."""
        self._held_bytes += nbytes - self._bytes.get(key, 0)
        self._bytes[key] = nbytes
        self.peak_bytes = max(self.peak_bytes, self._held_bytes)

    def _release(self, key: tuple[int, int], box: Box) -> None:
        """``box`` is read: drop the block after its last read, else keep (a copy of) only
        the part of it the remaining reads need."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and box in pending:
                pending.remove(box)
            if not pending:
                self._cached.pop(key, None)
                self._pending.pop(key, None)
                self._held_bytes -= self._bytes.pop(key, 0)
                return
            # a copy: another reader may release the last of them once the lock is let go
            # (the cut below then finds the block dropped and keeps nothing)
            pending = list(pending)
            fut = self._cached.get(key)
        if fut is None or not fut.done() or fut.exception() is not None:
            return
        oy, ox, data = fut.result()
        y0 = max(oy, min(b[0] for b in pending))
        y1 = min(oy + data.shape[0], max(b[1] for b in pending))
        x0 = max(ox, min(b[2] for b in pending))
        x1 = min(ox + data.shape[1], max(b[3] for b in pending))
        far = self.spill_after is not None and (
            min(self._order.get(b, self._at) for b in pending) - self._at > self.spill_after
        )
        if not far and (y1 - y0) * (x1 - x0) >= data.shape[0] * data.shape[1]:
            return
        part = data[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        if far:
            handle = self.spill.put(part)
        else:
            kept: Future = Future()
            kept.set_result((y0, x0, part.copy()))
        with self._lock:
            if self._cached.get(key) is not fut:  # replaced or dropped meanwhile
                if far:
                    self.spill.free(handle)
                return
            if far:  # the next read finds no future: _decode takes it back from the file
                del self._cached[key]
                self._parked[key] = (y0, x0, handle)
                self._held_bytes -= self._bytes.pop(key, 0)
            else:
                self._cached[key] = kept
                self._account(key, part.nbytes)

    def read(self, box: Box) -> np.ndarray:
        """Region ``box`` → (h, w, C) in the source dtype."""
        y0, y1, x0, x1 = box
        if self.block is None:
            return self.src.read(y0, y1, x0, x1)
        out = np.empty((y1 - y0, x1 - x0, self.src.channels), self.src.dtype)
        with self._lock:
            self._at = max(self._at, self._order.get(box, self._at))
        for key in self._blocks(box):
            by0, bx0, data = self._get(key)
            r0, r1 = max(y0, by0), min(y1, by0 + data.shape[0])
            c0, c1 = max(x0, bx0), min(x1, bx0 + data.shape[1])
            out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = data[
                r0 - by0 : r1 - by0, c0 - bx0 : c1 - bx0
            ]
            self._release(key, box)
        return out


@dataclass
class ShardWork:
    """One shard on its way through the stages.

    region: (h, w, C) source pixels of ``read_box`` (the shard's windows with their
    halos, clipped to the image); maps: per window (rows, cols) intp indices into region;
    labels, confidence: (H, W) uint8 shard buffers that post fills window by window.
    """

    key: tuple[int, int]
    box: Box
    read_box: Box
    region: np.ndarray
    windows: list[Window]
    maps: list[tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray | None = None
    confidence: np.ndarray | None = None
    #: (⌈H/tile⌉, ⌈W/tile⌉) float32 per-tile uncertainty, when computed on the device
    uncertainty: np.ndarray | None = None
    pending: int = field(default=0)

    @property
    def image(self) -> np.ndarray:
        """The shard's own source pixels, (C, H, W) (the image layer's copy)."""
        y0, y1, x0, x1 = self.box
        r0, _, c0, _ = self.read_box
        return np.moveaxis(self.region[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0], -1, 0)


def batches(work: ShardWork, size: int) -> Iterator[list[int]]:
    """Window indices of one shard in batches of at most ``size`` same-shape windows."""
    group: list[int] = []
    for i, w in enumerate(work.windows):
        first = work.windows[group[0]] if group else None
        if group and (len(group) == size or (w.sh, w.sw) != (first.sh, first.sw)):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def plan_windows(
    grid: TileGrid, key: tuple[int, int], boxes: list[Box] | None = None
) -> tuple[list[Window], Box]:
    """Windows of shard ``key`` (over the sub-boxes ``boxes`` only, when given: e.g. the
    chunks to re-segment) and the source box they read."""
    wins = (
        grid.windows(*key)
        if boxes is None
        else [w for b in boxes for w in grid.windows(*key, box=b)]
    )
    idx = [grid.window_indices(w)[:4] for w in wins]
    r0, r1 = min(i[0] for i in idx), max(i[1] for i in idx)
    c0, c1 = min(i[2] for i in idx), max(i[3] for i in idx)
    return wins, (r0, r1, c0, c1)


def index_maps(grid: TileGrid, wins: list[Window], box: Box) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window, (sh,) row and (sw,) column intp indices into the region ``box``
    (reflect padding at the image's edges included)."""
    return [
        (rows + (wr0 - box[0]), cols + (wc0 - box[2]))
        for wr0, _, wc0, _, rows, cols in map(grid.window_indices, wins)
    ]


class ShardReader:
    """Reads the shards of a job in order, ``workers`` ahead, through one ``BlockCache``;
    yields ``ShardWork`` items. ``parts``: shard → sub-boxes to cover (None: all)."""

    def __init__(
        self,
        src: ImageSource,
        grid: TileGrid,
        shards: list[tuple[int, int]],
        workers: int,
        stats: StageStats,
        parts: dict[tuple[int, int], list[Box]] | None = None,
    ) -> None:
        self.src, self.grid, self.workers, self.stats = src, grid, workers, stats
        self.plans = {k: plan_windows(grid, k, parts.get(k) if parts else None) for k in shards}
        self.shards = shards
        wins = [w for p in self.plans.values() for w in p[0]]
        #: model input pixels ÷ output pixels over the job (1 = no halo paid)
        self.halo_overhead = (
            sum(w.sh * w.sw for w in wins) / sum(w.h * w.w for w in wins) if wins else None
        )
        self.cache = BlockCache(src, (p[1] for p in self.plans.values()), SPILL_AFTER)
        self._lock = threading.Lock()

    def _read(self, key: tuple[int, int]) -> ShardWork:
        t0 = time.perf_counter()
        wins, read_box = self.plans.pop(key)
        maps = index_maps(self.grid, wins, read_box)  # here, not upfront: 34 KB a window
        region = self.cache.read(read_box)
        with self._lock:
            self.stats.busy_s += time.perf_counter() - t0
        return ShardWork(key, self.grid.shard_box(*key), read_box, region, wins, maps)

    def __iter__(self) -> Iterator[ShardWork]:
        pending: deque[Future] = deque()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="segloop-read") as pool:
                for key in self.shards:
                    pending.append(pool.submit(self._read, key))
                    if len(pending) > self.workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
        finally:
            self.cache.spill.close()
