"""Pyramid levels, built shard by shard as their sources finish.

A level-k shard covers exactly the 2×2 level-(k−1) shards below it (same shard size in
pixels at every level), so it is built once those are listed in the manifest: one writer
per shard, memory bounded by four shards. Image and confidence: 2×2 mean (rounded).
Labels: 2×2 mode, ties to the top-left pixel (nearest) — never an average of classes.
"""

from __future__ import annotations

import numpy as np

from segloop.io.ome_zarr import LAYERS, OutputStore
from segloop.pipeline.manifest import Key, Manifest


def _pad_even(a: np.ndarray) -> np.ndarray:
    """Edge-replicate the last row/column of (…, h, w) so both are even."""
    ph, pw = a.shape[-2] % 2, a.shape[-1] % 2
    if ph or pw:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)], mode="edge")
    return a


def downsample_mean(a: np.ndarray) -> np.ndarray:
    """(…, h, w) integer → (…, ⌈h/2⌉, ⌈w/2⌉), 2×2 mean rounded half up, same dtype."""
    a = _pad_even(a)
    s = (
        a[..., ::2, ::2].astype(np.uint32)
        + a[..., 1::2, ::2]
        + a[..., ::2, 1::2]
        + a[..., 1::2, 1::2]
    )
    return ((s + 2) // 4).astype(a.dtype)


def downsample_mode(a: np.ndarray) -> np.ndarray:
    """(h, w) labels → (⌈h/2⌉, ⌈w/2⌉): most frequent of each 2×2 block, ties → top-left.

    With blocks [[a, b], [c, d]]: a wins when it occurs twice or more (no other value can
    then occur more often); otherwise a pair among b, c, d wins (b if b == c or b == d,
    else c if c == d), and four distinct values tie to a."""
    a = _pad_even(a)
    tl, tr, bl, br = a[::2, ::2], a[::2, 1::2], a[1::2, ::2], a[1::2, 1::2]
    best = tl.copy()
    alone = (tl != tr) & (tl != bl) & (tl != br)
    pick_tr = alone & ((tr == bl) | (tr == br))
    best[pick_tr] = tr[pick_tr]
    pick_bl = alone & ~pick_tr & (bl == br)
    best[pick_bl] = bl[pick_bl]
    return best


class PyramidBuilder:
    """Builds every level-k shard whose level-(k−1) children are all finished."""

    def __init__(self, store: OutputStore, manifest: Manifest) -> None:
        self.store = store
        self.grid = store.grid
        self.manifest = manifest

    def _children(self, level: int, sy: int, sx: int) -> list[Key]:
        ny, nx = self.grid.shard_grid(level - 1)
        return [
            (level - 1, y, x)
            for y in (2 * sy, 2 * sy + 1)
            for x in (2 * sx, 2 * sx + 1)
            if y < ny and x < nx
        ]

    def _build(self, level: int, sy: int, sx: int, layers: tuple[str, ...] = LAYERS) -> None:
        y0, y1, x0, x1 = self.grid.shard_box(sy, sx, level)
        src = self.grid.level_shape(level - 1)
        box = (2 * y0, min(src[0], 2 * y1), 2 * x0, min(src[1], 2 * x1))
        for layer in layers:
            data = self.store.read(layer, level - 1, box)
            down = downsample_mode(data) if layer == "segmentation" else downsample_mean(data)
            self.store.write(layer, level, (y0, y1, x0, x1), down)
        if layers == LAYERS:
            self.manifest.add((level, sy, sx))

    def shard_done(self, key: Key) -> None:
        """Call after ``key`` was written and listed: builds the parents it completes."""
        level, sy, sx = key
        while level + 1 < self.grid.levels:
            parent = (level + 1, sy // 2, sx // 2)
            if parent in self.manifest or not all(
                c in self.manifest for c in self._children(*parent)
            ):
                return
            self._build(*parent)
            level, sy, sx = parent

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
