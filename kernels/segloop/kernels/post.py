"""Post-processing: NCHW logits → halo cropped, argmax labels + confidence, in one pass.

Confidence is the softmax maximum rescaled so that 0 = uniform over the K classes and
255 = certain: ``round(255 * (p_max - 1/K) / (1 - 1/K))``, uint8.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from segloop.kernels import PARALLEL_LAUNCH


@nb.njit(parallel=True, nogil=True, cache=True)
def _labels_confidence(logits, halo, labels, confidence):
    n, k = logits.shape[0], logits.shape[1]
    h, w = labels.shape[1], labels.shape[2]
    floor = 1.0 / k
    gain = 255.0 / (1.0 - floor)
    for b in range(n):
        for i in nb.prange(h):
            y = i + halo
            for j in range(w):
                x = j + halo
                best = 0
                top = logits[b, 0, y, x]
                for c in range(1, k):
                    v = logits[b, c, y, x]
                    if v > top:
                        top = v
                        best = c
                total = 0.0
                for c in range(k):
                    total += math.exp(logits[b, c, y, x] - top)
                q = (1.0 / total - floor) * gain
                labels[b, i, j] = best
                confidence[b, i, j] = np.uint8(min(255.0, max(0.0, q + 0.5)))


def certain_margin(k: int) -> float:
    """Logit margin (top − runner-up) above which confidence is 255 for ``k`` classes.

    confidence = 255 ⇔ q + 0.5 ≥ 255 ⇔ p_max ≥ 1 − ε with ε = (0.5/255)(1 − 1/k); p_max =
    1 / (1 + Σ exp(d_c)) over the other classes (d_c ≤ −margin), so (k − 1)·exp(−margin)
    ≤ ε suffices. 0.05 of slack keeps float rounding of the exact path far away.
    """
    eps = (0.5 / 255.0) * (1.0 - 1.0 / k)
    return math.log((k - 1) / eps) + 0.05


@nb.njit(parallel=True, nogil=True, cache=True)
def _windows_into(logits, halo, origins, sizes, margin, labels, confidence):
    n, k = logits.shape[0], logits.shape[1]
    floor = 1.0 / k
    gain = 255.0 / (1.0 - floor)
    rows = sizes[:, 0].max()
    for m in nb.prange(n * rows):
        b, i = m // rows, m % rows
        if i >= sizes[b, 0]:
            continue
        y = i + halo
        oy, ox = origins[b, 0] + i, origins[b, 1]
        for j in range(sizes[b, 1]):
            x = j + halo
            best = 0
            top = logits[b, 0, y, x]
            second = -np.inf
            for c in range(1, k):
                v = logits[b, c, y, x]
                if v > top:
                    second = top
                    top = v
                    best = c
                elif v > second:
                    second = v
            labels[oy, ox + j] = best
            if top - second >= margin:  # certain: the exact formula gives 255 too
                confidence[oy, ox + j] = 255
                continue
            total = 0.0
            for c in range(k):
                total += math.exp(logits[b, c, y, x] - top)
            q = (1.0 / total - floor) * gain
            confidence[oy, ox + j] = np.uint8(min(255.0, max(0.0, q + 0.5)))


def windows_into(
    logits: np.ndarray,
    halo: int,
    origins: np.ndarray,
    sizes: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
) -> None:
    """Write each window's core into shard buffers: logits (B, K, Sh, Sw) float →
    ``labels``, ``confidence`` (H, W) uint8 at ``origins[b]`` = (y, x), core size
    ``sizes[b]`` = (h, w), both (B, 2) intp. Same values as ``labels_confidence``."""
    margin = certain_margin(logits.shape[1])
    with PARALLEL_LAUNCH:
        _windows_into(logits, halo, origins, sizes, margin, labels, confidence)


def labels_confidence(logits: np.ndarray, halo: int, core: int) -> tuple[np.ndarray, np.ndarray]:
    """logits (B, K, S, S) float → labels, confidence (B, core, core) uint8.

    Pixels ``halo .. halo+core`` of each tile are kept; ties go to the lower class.
    """
    b = logits.shape[0]
    labels = np.empty((b, core, core), np.uint8)
    confidence = np.empty((b, core, core), np.uint8)
    with PARALLEL_LAUNCH:
        _labels_confidence(logits, halo, labels, confidence)
    return labels, confidence
