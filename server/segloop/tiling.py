"""Exact-halo tiling: chunks for the store, windows for the model.

Store: each level-0 chunk is a ``tile``² core (clipped at the image edge); chunks group
into ``shard``² shards (a multiple of ``tile``), each written whole by one writer.

Model: an inference *window* is a core of up to ``window``² px inside one shard (default:
the whole shard, so the halo is paid once per shard, not once per chunk) plus ``halo`` px
on every side, reflect-padded at image borders. With ``halo`` ≥ the receptive-field
radius and window origins on multiples of the model's downsampling factor, every core
pixel sees exactly what it would see in the whole reflect-padded image, so the output
does not depend on the window size (up to the float rounding of the runtime).
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
class Window:
    """Inference window: core origin (y0, x0), clipped core size (h, w) in level-0 px, and
    the model input (sh, sw) = core rounded up to the downsampling factor + 2 halo."""

    y0: int
    x0: int
    h: int
    w: int
    sh: int
    sw: int


#: shard rows per band of ``TileGrid.shard_order`` (a power of two)
SHARD_BAND = 8


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    halo: int
    shard: int
    #: core side of an inference window (px); None: one window per shard
    window: int | None = None
    #: the model's downsampling factor: window inputs are multiples of it
    multiple: int = 8

    @classmethod
    def create(
        cls,
        height: int,
        width: int,
        tile: int,
        halo: int,
        multiple: int,
        shard: int | None = None,
        window: int | None = None,
    ) -> TileGrid:
        """Validate ``tile``, ``shard`` (default ≈ 2048 px) and ``window`` (default: the
        shard); a small image is one tile."""
        if tile <= 0 or tile % multiple:
            raise UserError(f"--tile {tile} must be a positive multiple of {multiple}")
        if shard is not None and (shard < tile or shard % tile):
            raise UserError(f"--shard {shard} must be a multiple of --tile {tile}")
        if window is not None and (window <= 0 or window % multiple):
            raise UserError(f"--window {window} must be a positive multiple of {multiple}")
        whole = -(-max(height, width) // multiple) * multiple
        if tile >= whole:
            tile = shard = whole
        shard = shard or max(1, 2048 // tile) * tile
        if window is not None and window >= shard:
            window = None
        return cls(height, width, tile, halo, shard, window, multiple)

    def default_batch(self, pixels: int) -> int:
        """Windows per model call that make about ``pixels`` of model input (≥ 1)."""
        return max(1, pixels // (self.window_core + 2 * self.halo) ** 2)

    @property
    def window_core(self) -> int:
        """Core side of an interior inference window (px)."""
        return self.window or self.shard

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

    def shard_order(self, band: int = SHARD_BAND) -> list[tuple[int, int]]:
        """Level-0 shards in processing order: bands of ``band`` shard rows (a power of
        two), each band in Z (Morton) order of ``band``² squares, left to right.

        Row-major order keeps every pyramid parent of a shard row waiting for the next row
        (a band of quarters as wide as the image per level); Z order completes each
        level-k parent (k ≤ log2 band) right after its 2^k × 2^k children, and the read
        stage's kept halo band is the image's width plus one square's height.
        """
        bits = band.bit_length() - 1

        def z(key: tuple[int, int]) -> tuple[int, int]:
            sy, sx = key
            code = sx >> bits << 2 * bits  # squares left to right
            for b in range(bits):
                code |= ((sy >> b) & 1) << (2 * b + 1) | ((sx >> b) & 1) << (2 * b)
            return sy >> bits, code

        return sorted(self.shards(), key=z)

    def shard_box(self, sy: int, sx: int, level: int = 0) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a shard at ``level``, clipped to that level's shape."""
        h, w = self.level_shape(level)
        y0, x0 = sy * self.shard, sx * self.shard
        return y0, min(h, y0 + self.shard), x0, min(w, x0 + self.shard)

    def tiles(self, sy: int, sx: int) -> list[Tile]:
        """Level-0 tiles (= chunks) of one shard, row-major."""
        y0, y1, x0, x1 = self.shard_box(sy, sx)
        return [
            Tile(y, x, min(self.tile, y1 - y), min(self.tile, x1 - x))
            for y in range(y0, y1, self.tile)
            for x in range(x0, x1, self.tile)
        ]

    def windows(
        self, sy: int, sx: int, box: tuple[int, int, int, int] | None = None
    ) -> list[Window]:
        """Inference windows covering shard (sy, sx), row-major; ``box`` (y0, y1, x0, x1),
        a part of the shard, covers only that part."""
        y0, y1, x0, x1 = box or self.shard_box(sy, sx)
        step, m, pad = self.window_core, self.multiple, 2 * self.halo
        out = []
        for y in range(y0, y1, step):
            for x in range(x0, x1, step):
                h, w = min(step, y1 - y), min(step, x1 - x)
                out.append(Window(y, x, h, w, -(-h // m) * m + pad, -(-w // m) * m + pad))
        return out

    def window_indices(self, win: Window) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
        """Source box (r0, r1, c0, c1) to read and (sh,), (sw,) row/col indices into it."""
        rows = reflect_index(win.y0 - self.halo, win.sh, self.height)
        cols = reflect_index(win.x0 - self.halo, win.sw, self.width)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        return r0, r1, c0, c1, rows - r0, cols - c0

    def tile_window(self, t: Tile) -> Window:
        """The window of one chunk on its own (core = the chunk)."""
        m, pad = self.multiple, 2 * self.halo
        return Window(t.y0, t.x0, t.h, t.w, -(-t.h // m) * m + pad, -(-t.w // m) * m + pad)
