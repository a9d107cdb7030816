"""Pyramid and per-tile reductions (CPU, numba ``nogil``: writers run them in parallel).

- ``downsample_mean``: (…, h, w) uint8/uint16 → (…, ⌈h/2⌉, ⌈w/2⌉), 2×2 mean rounded half
  up, ``(a + b + c + d + 2) // 4``; an odd last row/column is edge-replicated.
- ``downsample_mode``: (h, w) uint8 labels → 2×2 mode, ties → top-left (never an average).
- ``tile_sums``: (h, w) uint8 confidence → per-tile sums of ``255 − c`` (int64).
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(nogil=True, cache=True)
def _mean2(src, out):
    h, w = src.shape[-2], src.shape[-1]
    for p in range(src.shape[0]):
        for i in range(out.shape[1]):
            y0, y1 = 2 * i, min(2 * i + 1, h - 1)
            for j in range(out.shape[2]):
                x0, x1 = 2 * j, min(2 * j + 1, w - 1)
                s = (
                    np.uint32(src[p, y0, x0])
                    + np.uint32(src[p, y0, x1])
                    + np.uint32(src[p, y1, x0])
                    + np.uint32(src[p, y1, x1])
                )
                out[p, i, j] = (s + 2) // 4


def downsample_mean(a: np.ndarray) -> np.ndarray:
    """(…, h, w) integer → (…, ⌈h/2⌉, ⌈w/2⌉), 2×2 mean rounded half up, same dtype."""
    lead = a.shape[:-2]
    src = a.reshape(-1, *a.shape[-2:])
    out = np.empty((src.shape[0], -(-a.shape[-2] // 2), -(-a.shape[-1] // 2)), a.dtype)
    _mean2(src, out)
    return out.reshape(*lead, *out.shape[1:])


@nb.njit(nogil=True, cache=True)
def _mode2(src, out):
    h, w = src.shape
    for i in range(out.shape[0]):
        y0, y1 = 2 * i, min(2 * i + 1, h - 1)
        for j in range(out.shape[1]):
            x0, x1 = 2 * j, min(2 * j + 1, w - 1)
            tl, tr, bl, br = src[y0, x0], src[y0, x1], src[y1, x0], src[y1, x1]
            best = tl
            if tl != tr and tl != bl and tl != br:  # tl occurs once: a pair among the rest
                if tr == bl or tr == br:  # noqa: SIM109 - numba: plain compares
                    best = tr
                elif bl == br:
                    best = bl
            out[i, j] = best


def downsample_mode(a: np.ndarray) -> np.ndarray:
    """(h, w) labels → (⌈h/2⌉, ⌈w/2⌉): most frequent of each 2×2 block, ties → top-left.

    With blocks [[a, b], [c, d]]: a wins when it occurs twice or more (no other value can
    then occur more often); otherwise a pair among b, c, d wins (b if b == c or b == d,
    else c if c == d), and four distinct values tie to a."""
    out = np.empty((-(-a.shape[0] // 2), -(-a.shape[1] // 2)), a.dtype)
    _mode2(a, out)
    return out


@nb.njit(nogil=True, cache=True)
def _tile_sums(conf, tile, out):
    h, w = conf.shape
    for i in range(h):
        ti = i // tile
        for tj in range(out.shape[1]):
            x0, x1 = tj * tile, min(tj * tile + tile, w)
            s = np.uint32(0)  # a row of one tile: ≤ 255 · tile, vectorised (8.5 → 2 ms, 2048²)
            for j in range(x0, x1):
                s += np.uint32(conf[i, j])
            out[ti, tj] += np.int64(255 * (x1 - x0)) - np.int64(s)


def tile_sums(confidence: np.ndarray, tile: int) -> np.ndarray:
    """(h, w) uint8 → (⌈h/tile⌉, ⌈w/tile⌉) int64 sums of ``255 − confidence``."""
    h, w = confidence.shape
    out = np.zeros((-(-h // tile), -(-w // tile)), np.int64)
    _tile_sums(confidence, tile, out)
    return out
