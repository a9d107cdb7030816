"""CUDA twin of ``kernels.post``: a batch of windows' logits → halo cropped labels and
confidence, written straight into a device shard buffer, in one launch; plus the shard's
per-tile uncertainty (``pipeline.uncertainty.tile_uncertainty``) in a second launch.

Definitions (as the CPU twins): label = argmax over the K classes, ties → the lower class;
confidence = ``round(255 · (p_max − 1/K) / (1 − 1/K))`` clamped to 0..255, uint8, with
``p_max = 1 / Σ_c exp(l_c − l_max)``. Math is float32 (one pass, online softmax: each
logit is read once); the CPU twin sums in float64, so confidence may differ by 1 where
``q + 0.5`` lies within float32 rounding of an integer. Labels agree exactly.

Uncertainty = mean over a tile's pixels of ``1 − conf/255``: here an exact integer sum of
``conf`` per tile, then ``1 − sum / (255 · count)`` in float64, stored as float32. The
CPU twin sums float32 terms, so the two agree to its rounding (≤ 6e-8 against the exact
value on random 256²–1024² tiles, measured; tested to 1e-6).

Launch geometry: ``threadIdx.x`` walks columns (32 × 8 per block), so logits reads and
label/confidence writes are coalesced along rows. Inputs may be numba device arrays, CuPy
arrays or torch CUDA tensors (``__cuda_array_interface__``). Runs under
``NUMBA_ENABLE_CUDASIM=1`` in CI (``tests/test_kernels_cuda.py``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32, int64, uint32

from segloop.kernels.pre_cuda import as_device, is_device

THREADS = (32, 8, 1)
#: threads per block of the uncertainty reduction (one block per tile); under the
#: simulator, where each thread is a Python thread, 32 keep the CI check fast (same code)
REDUCE_THREADS = 32 if config.ENABLE_CUDASIM else 256


@cuda.jit
def _windows_into(logits, halo, origins, sizes, floor, gain, labels, confidence):
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    b = cuda.blockIdx.z
    if b >= logits.shape[0] or i >= sizes[b, 0] or j >= sizes[b, 1]:
        return
    y = i + halo
    x = j + halo
    k = logits.shape[1]
    top = float32(logits[b, 0, y, x])
    total = float32(1.0)
    best = 0
    for c in range(1, k):
        v = float32(logits[b, c, y, x])
        if v > top:  # strict: ties keep the lower class
            total = total * math.exp(top - v) + float32(1.0)
            top = v
            best = c
        else:
            total += math.exp(v - top)
    q = (float32(1.0) / total - floor) * gain + float32(0.5)
    q = min(float32(255.0), max(float32(0.0), q))
    oy = origins[b, 0] + i
    ox = origins[b, 1] + j
    labels[oy, ox] = best
    confidence[oy, ox] = q


def _check_windows(logits, halo, origins, sizes, labels, confidence) -> None:
    b, _, sh, sw = logits.shape
    if tuple(origins.shape) != (b, 2) or tuple(sizes.shape) != (b, 2):
        raise ValueError(
            f"origins {tuple(origins.shape)} / sizes {tuple(sizes.shape)}: want ({b}, 2)"
        )
    if labels.shape != confidence.shape or len(labels.shape) != 2:
        raise ValueError(f"labels {labels.shape} / confidence {confidence.shape}: want (H, W)")
    if sh <= 2 * halo or sw <= 2 * halo:
        raise ValueError(f"window {sh}×{sw} has no core inside halo {halo}")


def windows_into(logits, halo: int, origins, sizes, labels, confidence, stream=0) -> None:
    """Write each window's core labels and confidence into the shard buffers.

    logits: (B, K, Sh, Sw) float16/float32 device array (the model's output).
    halo: px cropped on the top and left of each window; window b keeps
        ``logits[b, :, halo:halo+h_b, halo:halo+w_b]`` with (h_b, w_b) = ``sizes[b]``
        (h_b ≤ Sh − 2·halo, w_b ≤ Sw − 2·halo; clipped edge tiles are smaller).
    origins: (B, 2) int32 device array, (y, x) of each core in the shard buffers.
    sizes: (B, 2) int32 device array, (h, w) of each core.
    labels, confidence: (H, W) uint8 device arrays (the shard buffers), written at
        ``[y:y+h, x:x+w]``; nothing outside the cores is touched.
    stream: numba stream (0 = default). Asynchronous: returns at once.
    Bounds are the caller's promise (checked on the host only for shapes).
    """
    logits, origins, sizes, labels, confidence = (
        as_device(a) for a in (logits, origins, sizes, labels, confidence)
    )
    _check_windows(logits, halo, origins, sizes, labels, confidence)
    b, k, sh, sw = logits.shape
    if b == 0:
        return
    floor = 1.0 / k
    blocks = (-(-(sw - 2 * halo) // THREADS[0]), -(-(sh - 2 * halo) // THREADS[1]), b)
    _windows_into[blocks, THREADS, stream](
        logits,
        halo,
        origins,
        sizes,
        np.float32(floor),
        np.float32(255.0 / (1.0 - floor)),
        labels,
        confidence,
    )


@cuda.jit
def _tile_uncertainty(confidence, tile, out):
    ty = cuda.blockIdx.y
    tx = cuda.blockIdx.x
    y0 = ty * tile
    x0 = tx * tile
    h = min(tile, confidence.shape[0] - y0)
    w = min(tile, confidence.shape[1] - x0)
    part = cuda.shared.array(REDUCE_THREADS, int64)
    t = cuda.threadIdx.x
    acc = uint32(0)  # ≤ 255 · tile · ⌈tile / REDUCE_THREADS⌉: fits up to tile 16384
    # the tile's rows in turn, each row's columns spread over the block: coalesced
    for r in range(h):
        for c in range(t, w, REDUCE_THREADS):
            acc += uint32(confidence[y0 + r, x0 + c])
    part[t] = int64(acc)
    cuda.syncthreads()
    s = REDUCE_THREADS // 2
    while s > 0:
        if t < s:
            part[t] += part[t + s]
        cuda.syncthreads()
        s //= 2
    if t == 0:
        out[ty, tx] = 1.0 - part[0] / (255.0 * h * w)


def tile_uncertainty(confidence, tile: int, out, stream=0) -> None:
    """Per-tile uncertainty of a shard: one launch, one block per tile.

    confidence: (h, w) uint8 device array: the filled part of the shard buffer (a slice
        ``conf[:h, :w]`` of a larger buffer works; clipped edge tiles average over their
        own pixels only, as on the CPU).
    tile: tile side (px) = the store's chunk side.
    out: (⌈h/tile⌉, ⌈w/tile⌉) float32 device array; mean of ``1 − conf/255`` per tile.
    """
    confidence, out = as_device(confidence), as_device(out)
    h, w = confidence.shape
    grid = (-(-w // tile), -(-h // tile))
    if tuple(out.shape) != (grid[1], grid[0]):
        raise ValueError(f"out {tuple(out.shape)}: want {(grid[1], grid[0])} for tile {tile}")
    if h and w:
        _tile_uncertainty[grid, REDUCE_THREADS, stream](confidence, tile, out)


class ShardPost:
    """Reused device buffers of one shard for ``windows_into`` + ``tile_uncertainty``:
    labels and confidence (H, W) uint8, uncertainty (⌈H/tile⌉, ⌈W/tile⌉) float32, and
    pinned host + device slots for the windows' origins and sizes (max_batch, 2) int32.

    A device pipeline keeps a ring of these (one per shard in flight) so the D2H copy of
    one shard overlaps the post of the next. Buffers are not cleared between shards: the
    windows' cores cover a shard, and a clipped edge shard is read back as ``[:h, :w]``.
    """

    def __init__(self, shard: tuple[int, int], tile: int, max_batch: int, stream=0) -> None:
        """shard: (H, W) largest shard; tile: chunk side; max_batch: windows per call."""
        h, w = shard
        self.tile, self.stream, self.max_batch = tile, stream, max_batch
        self.labels = cuda.device_array((h, w), np.uint8, stream=stream)
        self.confidence = cuda.device_array((h, w), np.uint8, stream=stream)
        self.uncertainty = cuda.device_array(
            (-(-h // tile), -(-w // tile)), np.float32, stream=stream
        )
        self._host = cuda.pinned_array((2, max_batch, 2), np.int32)
        self._dev = cuda.device_array((2, max_batch, 2), np.int32, stream=stream)
        self._uploaded = None

    def windows(self, logits, halo: int, origins, sizes) -> None:
        """origins, sizes: (B, 2) host integer arrays (through the pinned slots) or device
        arrays; see ``windows_into``."""
        n = logits.shape[0]
        if n > self.max_batch:
            raise ValueError(f"batch {n} > max_batch {self.max_batch}")
        if not is_device(origins):
            if self._uploaded is not None:
                self._uploaded.synchronize()
            self._host[0, :n] = origins
            self._host[1, :n] = sizes
            self._dev.copy_to_device(self._host, stream=self.stream)
            self._uploaded = cuda.event()
            self._uploaded.record(self.stream)
            origins, sizes = self._dev[0, :n], self._dev[1, :n]
        windows_into(logits, halo, origins, sizes, self.labels, self.confidence, self.stream)

    def finish(self, shape: tuple[int, int]):
        """Uncertainty of the filled (h, w) part; returns the (⌈h/tile⌉, ⌈w/tile⌉) view."""
        h, w = shape
        out = self.uncertainty[: -(-h // self.tile), : -(-w // self.tile)]
        tile_uncertainty(self.confidence[:h, :w], self.tile, out, self.stream)
        return out
