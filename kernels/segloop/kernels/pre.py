"""Pre-processing: source region → normalised NCHW model input, in one pass.

Reflect padding is expressed as index maps (``reflect_index``), so the kernel reads every
output pixel straight from the decoded source region: no padded copy is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from segloop.kernels import PARALLEL_LAUNCH


@dataclass(frozen=True)
class Normalisation:
    """``out[c] = (src[channels[c]] / max_value - mean[c]) / std[c]``.

    channels: which source channel feeds each model channel (gray → (0, 0, 0),
    RGBA → (0, 1, 2)); max_value: 255 for uint8, 65535 for uint16.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: tuple[int, int, int] = (0, 1, 2)
    max_value: float = 255.0

    def coefficients(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale, offset, channels) arrays for ``out = src * scale - offset``."""
        std = np.asarray(self.std, np.float64)
        scale = (1.0 / (self.max_value * std)).astype(np.float32)
        offset = (np.asarray(self.mean, np.float64) / std).astype(np.float32)
        return scale, offset, np.asarray(self.channels, np.intp)


def reflect_index(start: int, length: int, size: int) -> np.ndarray:
    """Source indices for positions ``start .. start+length`` of an axis of ``size``.

    Out-of-range positions reflect about the edge pixels (numpy "reflect", no edge
    repeat), repeatedly if needed; size 1 maps everything to 0. Returns (length,) intp.
    """
    pos = np.arange(start, start + length, dtype=np.int64)
    if size == 1:
        return np.zeros(length, np.intp)
    period = 2 * (size - 1)
    pos = np.mod(pos, period)
    return np.where(pos < size, pos, period - pos).astype(np.intp)


@nb.njit(parallel=True, nogil=True, cache=True)
def _normalise(src, rows, cols, channels, scale, offset, out):
    for c in range(3):
        ch = channels[c]
        s = scale[c]
        o = offset[c]
        for i in nb.prange(rows.shape[0]):
            r = rows[i]
            for j in range(cols.shape[0]):
                out[c, i, j] = src[r, cols[j], ch] * s - o


@nb.njit(parallel=True, nogil=True, cache=True)
def _normalise_windows(src, rows, cols, channels, scale, offset, out):
    b, sh = rows.shape
    sw = cols.shape[1]
    for n in nb.prange(b * sh):
        w, i = n // sh, n % sh
        r = rows[w, i]
        for c in range(3):
            ch = channels[c]
            s = scale[c]
            o = offset[c]
            for j in range(sw):
                out[w, c, i, j] = src[r, cols[w, j], ch] * s - o


def normalise_windows(
    src: np.ndarray, rows: np.ndarray, cols: np.ndarray, norm: Normalisation, out: np.ndarray
) -> None:
    """Fill a batch ``out`` (B, 3, Sh, Sw) float32 from one region ``src`` (h, w, C).

    rows (B, Sh), cols (B, Sw) intp: each window's indices into src (reflect padding at
    image borders folded in). Same values as ``normalise_into`` window by window.
    """
    scale, offset, channels = norm.coefficients()
    with PARALLEL_LAUNCH:
        _normalise_windows(src, rows, cols, channels, scale, offset, out)


def normalise_into(
    src: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    norm: Normalisation,
    out: np.ndarray,
) -> None:
    """Fill one batch slot ``out`` (3, S, S) float32/float16 from ``src`` (h, w, C).

    rows, cols: (S,) intp indices into src (from ``reflect_index`` minus the region origin).
    """
    scale, offset, channels = norm.coefficients()
    with PARALLEL_LAUNCH:
        _normalise(src, rows, cols, channels, scale, offset, out)
