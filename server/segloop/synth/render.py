"""Procedural H&E-like histology, rendered region by region.

Every pixel is a pure function of ``(seed, y, x)`` (hashed value noise, hashed nucleus
lattice), so any region renders on its own and neighbouring regions agree exactly: a
gigapixel image is produced tile by tile with flat memory.

Classes: 0 background, 1 tissue (incl. stroma), 2 nucleus.
Colour: Beer–Lambert mix of two stain vectors (optical density → RGB).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

BACKGROUND, TISSUE, NUCLEUS = 0, 1, 2
CLASS_NAMES = ("background", "tissue", "nucleus")

#: stain modes: 0 = H&E, 1 = shifted (out of distribution), 2 = mixed (shifted patches)
STAIN_MODES = {"he": 0, "shifted": 1, "mixed": 2}

_CELL = 24  # nucleus lattice spacing (px); at most one nucleus per cell
_MAX_R = 13.0  # largest nucleus semi-axis incl. irregularity (px)

# optical-density stain vectors (R, G, B): [hematoxylin, eosin]
_STAINS = np.array(
    [
        [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]],  # H&E
        [[0.20, 0.45, 0.87], [0.45, 0.75, 0.05]],  # shifted: bluish nuclei, brownish tissue
    ],
    dtype=np.float32,
)


@nb.njit(inline="always")
def _hash(seed: int, a: int, b: int, c: int) -> float:
    """splitmix64 of four integers → float in [0, 1)."""
    z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z ^= np.uint64(a & 0xFFFFFFFF) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= np.uint64(b & 0xFFFFFFFF) * np.uint64(0x94D049BB133111EB)
    z ^= np.uint64(c & 0xFFFFFFFF) * np.uint64(0xD6E8FEB86659FD93)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@nb.njit(inline="always")
def _noise(seed: int, y: float, x: float, scale: float, layer: int) -> float:
    """Smooth value noise in [0, 1) with lattice spacing ``scale`` px."""
    gy = y / scale
    gx = x / scale
    iy = math.floor(gy)
    ix = math.floor(gx)
    fy = gy - iy
    fx = gx - ix
    fy = fy * fy * (3.0 - 2.0 * fy)
    fx = fx * fx * (3.0 - 2.0 * fx)
    a = _hash(seed, iy, ix, layer)
    b = _hash(seed, iy, ix + 1, layer)
    c = _hash(seed, iy + 1, ix, layer)
    d = _hash(seed, iy + 1, ix + 1, layer)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


@nb.njit(inline="always")
def _tissue_field(seed: int, y: float, x: float) -> float:
    return (
        0.55 * _noise(seed, y, x, 900.0, 1)
        + 0.3 * _noise(seed, y, x, 230.0, 2)
        + 0.15 * _noise(seed, y, x, 60.0, 3)
    )


@nb.njit(parallel=True, cache=True)
def render_region(
    seed: int, stain: int, y0: int, x0: int, step: int, rgb: np.ndarray, label: np.ndarray
) -> None:
    """Render level-0 coordinates ``y0 + step*i, x0 + step*j`` into the outputs.

    rgb: (h, w, 3) float32 optical density, filled in place (convert with ``od_to_rgb``).
    label: (h, w) uint8 classes, filled in place.
    """
    h, w = label.shape
    # nucleus parameters for every lattice cell that can touch the region
    cy0 = math.floor((y0 - _MAX_R) / _CELL) - 1
    cx0 = math.floor((x0 - _MAX_R) / _CELL) - 1
    ncy = math.ceil((step * h + 2 * _MAX_R) / _CELL) + 3
    ncx = math.ceil((step * w + 2 * _MAX_R) / _CELL) + 3
    par = np.zeros((ncy, ncx, 8), dtype=np.float64)  # present, cy, cx, a, b, cos, sin, dark
    for i in nb.prange(ncy):
        for j in range(ncx):
            cy = cy0 + i
            cx = cx0 + j
            if _hash(seed, cy, cx, 10) > 0.62:
                continue
            py = (cy + 0.15 + 0.7 * _hash(seed, cy, cx, 11)) * _CELL
            px = (cx + 0.15 + 0.7 * _hash(seed, cy, cx, 12)) * _CELL
            if _tissue_field(seed, py, px) < 0.47:
                continue
            a = 4.5 + 6.5 * _hash(seed, cy, cx, 13)
            b = a * (0.55 + 0.45 * _hash(seed, cy, cx, 14))
            th = math.pi * _hash(seed, cy, cx, 15)
            par[i, j, 0] = 1.0
            par[i, j, 1] = py
            par[i, j, 2] = px
            par[i, j, 3] = a
            par[i, j, 4] = b
            par[i, j, 5] = math.cos(th)
            par[i, j, 6] = math.sin(th)
            par[i, j, 7] = 0.75 + 0.8 * _hash(seed, cy, cx, 16)
    for r in nb.prange(h):
        y = y0 + step * r
        for c in range(w):
            x = x0 + step * c
            fy = float(y)
            fx = float(x)
            shifted = stain == 1 or (stain == 2 and _noise(seed, fy, fx, 1500.0, 20) > 0.58)
            s = 1 if shifted else 0
            t = _tissue_field(seed, fy, fx)
            hem = 0.0
            eos = 0.0
            lab = BACKGROUND
            if t >= 0.47:
                lab = TISSUE
                ang = 3.0 * _noise(seed, fy, fx, 400.0, 4)
                fib = 0.5 + 0.5 * math.sin(
                    0.35 * (fx * math.cos(ang) + fy * math.sin(ang))
                    + 7.0 * _noise(seed, fy, fx, 40.0, 5)
                )
                stroma = _noise(seed, fy, fx, 180.0, 6)
                eos = 0.35 + 0.35 * stroma + 0.2 * fib * stroma + 0.1 * _noise(seed, fy, fx, 8.0, 7)
                hem = 0.04 + 0.06 * _noise(seed, fy, fx, 25.0, 8)
            # nuclei from the 3x3 lattice neighbourhood
            ci = math.floor(fy / _CELL) - cy0
            cj = math.floor(fx / _CELL) - cx0
            for di in range(-1, 2):
                for dj in range(-1, 2):
                    p = par[ci + di, cj + dj]
                    if p[0] == 0.0:
                        continue
                    dy = fy - p[1]
                    dx = fx - p[2]
                    u = dx * p[5] + dy * p[6]
                    v = -dx * p[6] + dy * p[5]
                    phi = math.atan2(v, u)
                    rim = 1.0 + 0.1 * math.sin(3.0 * phi + 6.28 * p[7])
                    q = (u / p[3]) ** 2 + (v / p[4]) ** 2
                    if q < rim * rim:
                        lab = NUCLEUS
                        chrom = _noise(seed, fy, fx, 2.5, 9)
                        hem = p[7] * (0.75 + 0.5 * chrom)
                        eos = 0.12
            label[r, c] = lab
            for k in range(3):
                rgb[r, c, k] = 0.03 + hem * _STAINS[s, 0, k] + eos * _STAINS[s, 1, k]


@nb.njit(parallel=True, cache=True)
def od_to_rgb(seed: int, y0: int, x0: int, step: int, od: np.ndarray, out: np.ndarray) -> None:
    """Optical density (h, w, 3) float32 → uint8 RGB with hashed sensor noise (σ≈3 DN)."""
    h, w, _ = od.shape
    for r in nb.prange(h):
        for c in range(w):
            for k in range(3):
                n = (
                    _hash(seed, y0 + step * r, x0 + step * c, 30 + k)
                    + _hash(seed, y0 + step * r, x0 + step * c, 33 + k)
                    - 1.0
                ) * 7.0
                v = 255.0 * math.exp(-od[r, c, k]) + n
                out[r, c, k] = np.uint8(min(255.0, max(0.0, v + 0.5)))
