"""CUDA twin of ``kernels.post``: one thread per kept pixel, crop + softmax + argmax +
confidence in one pass; only uint8 labels and confidence go back over PCIe.

Same definition as the CPU twin (ties → lower class; confidence =
round(255 · (p_max − 1/K) / (1 − 1/K))). ``logits`` is a device array (B, K, S, S),
float32 or float16. Runs under ``NUMBA_ENABLE_CUDASIM=1`` in CI.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

THREADS = (1, 16, 16)


@cuda.jit
def _labels_confidence(logits, halo, labels, confidence):
    b, i, j = cuda.grid(3)
    n, k = logits.shape[0], logits.shape[1]
    if b < n and i < labels.shape[1] and j < labels.shape[2]:
        y = i + halo
        x = j + halo
        best = 0
        top = float(logits[b, 0, y, x])
        for c in range(1, k):
            v = float(logits[b, c, y, x])
            if v > top:
                top = v
                best = c
        total = 0.0
        for c in range(k):
            total += math.exp(float(logits[b, c, y, x]) - top)
        floor = 1.0 / k
        q = (1.0 / total - floor) * (255.0 / (1.0 - floor))
        labels[b, i, j] = best
        confidence[b, i, j] = min(255.0, max(0.0, q + 0.5))


def labels_confidence(logits, halo: int, core: int, stream=0):
    """Device logits (B, K, S, S) → device labels, confidence (B, core, core) uint8."""
    b = logits.shape[0]
    labels = cuda.device_array((b, core, core), np.uint8, stream=stream)
    confidence = cuda.device_array((b, core, core), np.uint8, stream=stream)
    blocks = (b, -(-core // THREADS[1]), -(-core // THREADS[2]))
    _labels_confidence[blocks, THREADS, stream](logits, halo, labels, confidence)
    return labels, confidence
