"""CUDA twin of ``kernels.pre``: one thread per output pixel, all three channels.

Same arguments as ``pre.normalise_into`` but ``src``, ``rows``, ``cols`` and ``out`` are
device arrays (numba device arrays, or CuPy/torch tensors through
``__cuda_array_interface__`` / DLPack): the uint8/uint16 region crosses PCIe, the float
batch is made on the device. ``out`` may be float32 or float16. Runs on the CPU under
``NUMBA_ENABLE_CUDASIM=1`` (how CI checks it against the CPU twin).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from segloop.kernels.pre import Normalisation

THREADS = (16, 16)


@cuda.jit
def _normalise(src, rows, cols, channels, scale, offset, out):
    i, j = cuda.grid(2)
    if i < out.shape[1] and j < out.shape[2]:
        r = rows[i]
        c = cols[j]
        for k in range(3):
            out[k, i, j] = src[r, c, channels[k]] * scale[k] - offset[k]


def normalise_into(src, rows, cols, norm: Normalisation, out, stream=0) -> None:
    """Fill device ``out`` (3, S, S) from device ``src`` (h, w, C); rows/cols (S,) intp."""
    scale, offset, channels = (cuda.to_device(a, stream=stream) for a in norm.coefficients())
    blocks = (-(-out.shape[1] // THREADS[0]), -(-out.shape[2] // THREADS[1]))
    _normalise[blocks, THREADS, stream](src, rows, cols, channels, scale, offset, out)


def normalise_batch(regions: list, indices: list, norm: Normalisation, dtype=np.float32, stream=0):
    """(B, 3, S, S) device batch from B device regions and their (rows, cols) indices."""
    s = len(indices[0][0])
    out = cuda.device_array((len(regions), 3, s, s), dtype=dtype, stream=stream)
    for i, (src, (rows, cols)) in enumerate(zip(regions, indices, strict=True)):
        normalise_into(src, rows, cols, norm, out[i], stream)
    return out
