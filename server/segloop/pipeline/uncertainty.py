"""Per-tile uncertainty: the order of the review queue (least certain first).

Score of a tile = mean over its pixels of ``1 − c/255``, where ``c`` is the stored
confidence (softmax maximum rescaled so 0 = uniform over the classes, 255 = certain; see
``kernels/post.py``). 0: every pixel certain; 1: every pixel a toss-up between all
classes. Stored at segment time in ``tiles/uncertainty`` (float32, NaN = not segmented).
"""

from __future__ import annotations

import numpy as np

from segloop.kernels.pyramid import tile_sums


def tile_uncertainty(confidence: np.ndarray, tile: int) -> np.ndarray:
    """(h, w) uint8 confidence → (⌈h/tile⌉, ⌈w/tile⌉) float32 scores; a clipped edge tile
    averages over its own pixels only (exact integer sums, one rounding to float32)."""
    h, w = confidence.shape
    rows, cols = np.arange(0, h, tile), np.arange(0, w, tile)
    counts = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))
    return (tile_sums(confidence, tile) / (255.0 * counts)).astype(np.float32)
