"""Pyramid levels, built shard by shard as their sources finish.

A level-k shard covers exactly the 2×2 level-(k−1) shards below it (same shard size in
pixels at every level), so it is built once those are listed in the manifest: one writer
per shard, memory bounded by four shards. Image and confidence: 2×2 mean (rounded).
Labels: 2×2 mode, ties to the top-left pixel (nearest) — never an average of classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from segloop.io.ome_zarr import OutputStore, Part
from segloop.kernels.pyramid import downsample_mean, downsample_mode
from segloop.pipeline.manifest import Key, Manifest

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) at one level
Quarter = dict[str, np.ndarray]  # layer → a child shard downsampled once


class PyramidBuilder:
    """Builds every level-k shard once its level-(k−1) children are all finished.

    Thread-safe: writers call ``shard_done`` from a pool, each finished shard with its
    quarter (its arrays downsampled once, in memory); the parent is written (by
    ``write_level``: in this process, or by a writer process) when its last child is in,
    from the quarters, reading from the store only the children finished by an earlier
    run. Memory: the quarters of the parents still waiting for children
    (``peak_quarters``): a few per level in ``TileGrid.shard_order``, a row of shards per
    level in row-major order.
    """

    def __init__(
        self,
        store: OutputStore,
        manifest: Manifest,
        write_level: Callable[[int, Box, dict[str, np.ndarray]], Quarter | None] | None = None,
    ) -> None:
        """write_level(level, box, arrays) writes a finished parent and returns its own
        quarter (None at the top); default: in this thread (``write_level`` below)."""
        self.store = store
        self.grid = store.grid
        self.manifest = manifest
        self.layers = store.layers
        self.write_level = write_level or (lambda lv, b, a: write_level_local(store, lv, b, a))
        self._lock = threading.Lock()
        self._quarters: dict[Key, dict[Key, Quarter]] = {}
        self._claimed: set[Key] = set()
        self._held = 0  # quarters held now, and at most (the memory bound)
        self.peak_quarters = 0

    def _children(self, level: int, sy: int, sx: int) -> list[Key]:
        ny, nx = self.grid.shard_grid(level - 1)
        return [
            (level - 1, y, x)
            for y in (2 * sy, 2 * sy + 1)
            for x in (2 * sx, 2 * sx + 1)
            if y < ny and x < nx
        ]

    def _build(self, level: int, sy: int, sx: int, layers: tuple[str, ...] | None = None) -> None:
        """Parent (level, sy, sx) from the level below in the store: every layer, listed
        in the manifest (``layers`` None), or only ``layers``, not listed."""
        y0, y1, x0, x1 = self.grid.shard_box(sy, sx, level)
        src = self.grid.level_shape(level - 1)
        box = (2 * y0, min(src[0], 2 * y1), 2 * x0, min(src[1], 2 * x1))
        for layer in layers or self.layers:
            down = _down(layer, self.store.read(layer, level - 1, box))
            self.store.write(layer, level, (y0, y1, x0, x1), down)
        if layers is None:
            self.manifest.add((level, sy, sx))

    def shard_done(self, key: Key, quarter: Quarter | None = None) -> None:
        """Call after ``key`` was written and listed, with its quarter (its arrays
        downsampled once, ``quarter_of``) when at hand: builds the parents it completes."""
        while key[0] + 1 < self.grid.levels:
            level, sy, sx = key
            parent = (level + 1, sy // 2, sx // 2)
            with self._lock:
                if parent in self.manifest or parent in self._claimed:
                    return  # a sibling's thread builds it (reading this child from the store)
                if quarter is not None:
                    self._quarters.setdefault(parent, {})[key] = quarter
                    self._held += 1
                    self.peak_quarters = max(self.peak_quarters, self._held)
                children = self._children(*parent)
                if not all(c in self.manifest for c in children):
                    return
                self._claimed.add(parent)
                quarters = self._quarters.pop(parent, {})
                self._held -= len(quarters)
            data = self._assemble(parent, children, quarters)
            box = self.grid.shard_box(*parent[1:], level=parent[0])
            quarter = self.write_level(parent[0], box, data)
            with self._lock:
                self.manifest.add(parent)
            key = parent

    def _assemble(
        self, parent: Key, children: list[Key], quarters: dict[Key, dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The parent's arrays from its children's quarters (missing ones from the store)."""
        level, sy, sx = parent
        y0, y1, x0, x1 = self.grid.shard_box(sy, sx, level)
        half = self.grid.shard // 2
        out: dict[str, np.ndarray] = {}
        for child in children:
            q = quarters.get(child)
            if q is None:  # finished by an earlier run: downsample it from the store
                b = self.grid.shard_box(*child[1:], level=child[0])
                q = {
                    layer: _down(layer, self.store.read(layer, child[0], b))
                    for layer in self.layers
                }
            oy, ox = (child[1] % 2) * half, (child[2] % 2) * half
            for layer, a in q.items():
                if layer not in out:
                    lead = a.shape[:-2]
                    out[layer] = np.zeros((*lead, y1 - y0, x1 - x0), a.dtype)
                out[layer][..., oy : oy + a.shape[-2], ox : ox + a.shape[-1]] = a
        return out

    def complete(self) -> None:
        """Build whatever is still missing (resume after a kill between the two steps)."""
        for level in range(1, self.grid.levels):
            for sy, sx in self.grid.shards(level):
                if (level, sy, sx) not in self.manifest:
                    self._build(level, sy, sx)

    def rebuild(self, shards: set[tuple[int, int]], layers: tuple[str, ...]) -> None:
        """Rebuild ``layers`` above the rewritten level-0 ``shards``, each parent once."""
        for level in range(1, self.grid.levels):
            shards = {(sy // 2, sx // 2) for sy, sx in shards}
            for sy, sx in sorted(shards):
                self._build(level, sy, sx, layers)


def quarter_of(arrays: dict[str, np.ndarray]) -> Quarter:
    """A finished shard's arrays one pyramid step down (its quarter of the parent)."""
    return {layer: _down(layer, a) for layer, a in arrays.items()}


def write_level_local(
    store: OutputStore, level: int, box: Box, arrays: dict[str, np.ndarray], *extra: Part
) -> Quarter | None:
    """Write one shard's ``arrays`` at ``level`` (and ``extra`` parts, in the same call);
    its quarter, or None at the top level."""
    store.put(*extra, *(store.shard_part(layer, level, box, a) for layer, a in arrays.items()))
    return quarter_of(arrays) if level + 1 < store.grid.levels else None


def _down(layer: str, a: np.ndarray) -> np.ndarray:
    """One pyramid step of ``layer``: 2×2 mode for labels, 2×2 mean otherwise."""
    return downsample_mode(a) if layer == "segmentation" else downsample_mean(a)
