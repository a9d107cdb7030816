"""Exact-halo tiling.

Each tile's core (``tile``² px, clipped at the image edge) is one output chunk; the model
sees the core plus ``halo`` px on every side, reflect-padded at image borders. With
``halo`` ≥ the receptive-field radius and tile, halo multiples of the model's downsampling
factor, the tiled output equals the output of the whole reflect-padded image.
Shards (``shard`` px, a multiple of ``tile``) group chunks; each is written by one writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from segloop.errors import UserError
from segloop.kernels.pre import reflect_index


@dataclass(frozen=True)
class Tile:
    """Core origin (y0, x0) and clipped core size (h, w) in level-0 pixels."""

    y0: int
    x0: int
    h: int
    w: int


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    halo: int
    shard: int

    @classmethod
    def create(
        cls, height: int, width: int, tile: int, halo: int, multiple: int, shard: int | None = None
    ) -> TileGrid:
        """Validate ``tile`` and ``shard`` (default: ~2048 px); a small image is one tile."""
        if tile <= 0 or tile % multiple:
            raise UserError(f"--tile {tile} must be a positive multiple of {multiple}")
        if shard is not None and (shard < tile or shard % tile):
            raise UserError(f"--shard {shard} must be a multiple of --tile {tile}")
        whole = -(-max(height, width) // multiple) * multiple
        if tile >= whole:
            tile = shard = whole
        shard = shard or max(1, 2048 // tile) * tile
        return cls(height, width, tile, halo, shard)

    @property
    def window(self) -> int:
        """Model input side: core + 2 halo (px)."""
        return self.tile + 2 * self.halo

    def shard_grid(self, level: int = 0) -> tuple[int, int]:
        h, w = self.level_shape(level)
        return -(-h // self.shard), -(-w // self.shard)

    def level_shape(self, level: int) -> tuple[int, int]:
        return -(-self.height >> level), -(-self.width >> level)

    @property
    def levels(self) -> int:
        """Pyramid depth: halve until the largest side fits one tile."""
        n = 1
        while max(self.level_shape(n - 1)) > self.tile:
            n += 1
        return n

    def shards(self, level: int = 0) -> Iterator[tuple[int, int]]:
        ny, nx = self.shard_grid(level)
        for sy in range(ny):
            for sx in range(nx):
                yield sy, sx

    def shard_box(self, sy: int, sx: int, level: int = 0) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a shard at ``level``, clipped to that level's shape."""
        h, w = self.level_shape(level)
        y0, x0 = sy * self.shard, sx * self.shard
        return y0, min(h, y0 + self.shard), x0, min(w, x0 + self.shard)

    def tiles(self, sy: int, sx: int) -> list[Tile]:
        """Level-0 tiles of one shard, row-major."""
        y0, y1, x0, x1 = self.shard_box(sy, sx)
        return [
            Tile(y, x, min(self.tile, y1 - y), min(self.tile, x1 - x))
            for y in range(y0, y1, self.tile)
            for x in range(x0, x1, self.tile)
        ]

    def window_indices(self, t: Tile) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
        """Source box (r0, r1, c0, c1) to read and (window,) row/col indices into it."""
        rows = reflect_index(t.y0 - self.halo, self.window, self.height)
        cols = reflect_index(t.x0 - self.halo, self.window, self.width)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        return r0, r1, c0, c1, rows - r0, cols - c0
