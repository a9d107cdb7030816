"""A large RGB test image, fast: one 2048² block of H&E-like colours (numpy, no JIT),
repeated (mirrored alternately, so no seam lines up) into a tiled, uncompressed BigTIFF.

``segloop synth`` renders ≈ 1 Mpx/s on one core, which would take minutes at 20480²;
the end-to-end phase times segloop's pipeline, not the picture, so a repeated block
serves. Uncompressed: the lent GPU machine has no imagecodecs (JPEG), and decode then
costs the readers only the copy.

``python benchmarks/gpu/make_image.py OUT.tif --size 20480``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

BLOCK, TILE = 2048, 512


def block(seed: int = 11) -> np.ndarray:
    """(2048, 2048, 3) uint8: pink stroma with darker purple blobs and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK].astype(np.float32) / BLOCK
    field = np.zeros((BLOCK, BLOCK), np.float32)
    for _ in range(12):  # low-frequency tissue density
        fy, fx, ph = rng.uniform(1, 8), rng.uniform(1, 8), rng.uniform(0, 6.3)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    tissue = field > 0
    blobs = np.zeros((BLOCK, BLOCK), bool)
    for cy, cx in rng.integers(0, BLOCK, (1500, 2)):  # nuclei
        r = int(rng.integers(4, 10))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, BLOCK), max(cx - r, 0), min(cx + r, BLOCK)
        sub = (yy[y0:y1, x0:x1] * BLOCK - cy) ** 2 + (xx[y0:y1, x0:x1] * BLOCK - cx) ** 2
        blobs[y0:y1, x0:x1] |= sub < r * r
    rgb = np.empty((BLOCK, BLOCK, 3), np.float32)
    rgb[:] = (242, 238, 240)
    rgb[tissue] = (232, 170, 200)
    rgb[blobs & tissue] = (110, 60, 150)
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write(path: Path, size: int) -> None:
    base = block()
    variants = [base, base[::-1], base[:, ::-1], base[::-1, ::-1]]

    def tiles():
        for ty in range(0, size, TILE):
            for tx in range(0, size, TILE):
                by, bx = ty // BLOCK, tx // BLOCK
                src = variants[(by + 2 * bx) % 4]
                y, x = ty % BLOCK, tx % BLOCK
                t = np.zeros((TILE, TILE, 3), np.uint8)
                h, w = min(TILE, size - ty), min(TILE, size - tx)
                t[:h, :w] = src[y : y + h, x : x + w]
                yield t

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE),
        photometric="rgb", bigtiff=True,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=20480)
    args = ap.parse_args()
    write(args.out, args.size)


if __name__ == "__main__":
    main()
