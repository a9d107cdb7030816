"""CUDA twin of ``kernels.pre``: cut a batch of windows out of a device-resident shard
region, normalise, write the model's NCHW float16/float32 input, in one launch.

Per output pixel ``out[b, k, i, j] = region[rows[b, i], cols[b, j], channels[k]] * scale[k]
- offset[k]`` (float32 math; the same definition and coefficients as the CPU twin,
``pre.normalise_into`` applied window by window). Reflect padding at image borders lives in
the index maps, which the host builds (``TileGrid.window_indices``): the kernel never
pads or copies the region.

Launch geometry: ``threadIdx.x`` walks columns ``j`` (32 × 8 threads per block, grid
``(⌈Sw/32⌉, ⌈Sh/8⌉, B)``), so a warp reads 32 neighbouring source pixels and writes 32
neighbouring outputs of each channel plane: coalesced loads and stores. The normalisation
coefficients travel as scalar kernel arguments (no device constant buffers, no per-call
copies). Inputs are numba device arrays or anything with ``__cuda_array_interface__``
(CuPy arrays, torch CUDA tensors), taken without a stream sync (``as_device``).

Runs on the CPU under ``NUMBA_ENABLE_CUDASIM=1`` (how CI checks it against the CPU twin;
``tests/test_kernels_cuda.py``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32

from segloop.kernels.pre import Normalisation

#: threads per block: x → columns (one warp wide), y → rows
THREADS = (32, 8, 1)


def is_device(a) -> bool:
    """True for a device array: numba's (also the simulator's) or any object with
    ``__cuda_array_interface__`` (CuPy, torch CUDA); False for numpy arrays."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "copy_to_host") or hasattr(a, "__cuda_array_interface__")


def as_device(a):
    """A numba device view of ``a`` (numba device array, or an object with
    ``__cuda_array_interface__``: CuPy, torch CUDA), without numba's implicit sync on
    the producer's stream: callers order work by launching on one stream (or events)."""
    if hasattr(a, "__cuda_array_interface__") and not hasattr(a, "copy_to_host"):
        return cuda.as_cuda_array(a, sync=False)
    return a


@functools.lru_cache(maxsize=64)
def _scalars(norm: Normalisation) -> tuple:
    """(c0, c1, c2, s0, s1, s2, o0, o1, o2): channel indices (int) and float32 scale/offset,
    as kernel scalar arguments (np.float32 so numba types them float32)."""
    scale, offset, channels = norm.coefficients()
    return (
        *(int(c) for c in channels),
        *(np.float32(s) for s in scale),
        *(np.float32(o) for o in offset),
    )


@cuda.jit
def _normalise_windows(region, rows, cols, c0, c1, c2, s0, s1, s2, o0, o1, o2, out):
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    b = cuda.blockIdx.z
    if j < out.shape[3] and i < out.shape[2] and b < out.shape[0]:
        r = rows[b, i]
        c = cols[b, j]
        out[b, 0, i, j] = float32(region[r, c, c0]) * s0 - o0
        out[b, 1, i, j] = float32(region[r, c, c1]) * s1 - o1
        out[b, 2, i, j] = float32(region[r, c, c2]) * s2 - o2


def _blocks(b: int, sh: int, sw: int) -> tuple[int, int, int]:
    return -(-sw // THREADS[0]), -(-sh // THREADS[1]), b


def normalise_windows(region, rows, cols, norm: Normalisation, out, stream=0) -> None:
    """Fill ``out[:B]`` from ``region``, one launch for the whole batch.

    region: (h, w, C) uint8/uint16 device array, the shard read box clipped to the image
        (C ∈ {1, 3, 4}; ``norm.channels`` picks the three model channels).
    rows: (B, Sh), cols: (B, Sw) int32/int64 device arrays: indices into ``region`` of
        each window's rows and columns (reflect padding already folded in).
    out: (B', 3, Sh, Sw) float16/float32 device array, B' ≥ B; only ``out[:B]`` is written.
    stream: numba stream (``cuda.stream()``, or ``cuda.external_stream(ptr)`` for a torch
        stream's ``cuda_stream``); 0 = the default stream. Asynchronous: returns at once.
    """
    n, sh, sw = rows.shape[0], rows.shape[1], cols.shape[1]
    if cols.shape[0] != n or out.shape[0] < n or tuple(out.shape[1:]) != (3, sh, sw):
        raise ValueError(
            f"rows {tuple(rows.shape)} / cols {tuple(cols.shape)} do not fit out "
            f"{tuple(out.shape)}: want rows (B, Sh), cols (B, Sw), out (≥B, 3, Sh, Sw)"
        )
    if n == 0:
        return
    region, rows, cols, out = (as_device(a) for a in (region, rows, cols, out))
    if out.shape[0] != n:
        out = out[:n]
    _normalise_windows[_blocks(n, sh, sw), THREADS, stream](
        region, rows, cols, *_scalars(norm), out
    )


class WindowNormaliser:
    """Reused buffers for ``normalise_windows``: the (max_batch, 3, Sh, Sw) output on the
    device, and pinned host + device slots for the index maps, so a batch costs one small
    H2D copy of its maps and one launch, and allocates nothing.

    ``__call__`` returns a view of the output buffer; it stays valid until the next call
    (later work on the same ``stream`` sees it complete: CUDA orders a stream's work).
    """

    def __init__(
        self,
        norm: Normalisation,
        max_batch: int,
        window: tuple[int, int],
        dtype=np.float16,
        stream=0,
    ) -> None:
        """window: (Sh, Sw) model input size; dtype: float16 (default) or float32."""
        sh, sw = window
        self.norm, self.stream, self.max_batch = norm, stream, max_batch
        self.out = cuda.device_array((max_batch, 3, sh, sw), dtype=dtype, stream=stream)
        self._rows_host = cuda.pinned_array((max_batch, sh), np.int32)
        self._cols_host = cuda.pinned_array((max_batch, sw), np.int32)
        self._rows = cuda.device_array((max_batch, sh), np.int32, stream=stream)
        self._cols = cuda.device_array((max_batch, sw), np.int32, stream=stream)
        self._uploaded = None  # event after the last maps upload (pinned slots reusable)

    def __call__(self, region, rows, cols):
        """region: (h, w, C) device array; rows (B, Sh), cols (B, Sw): host integer arrays
        (copied through the pinned slots) or device arrays (used as they are).
        Returns ``out[:B]``, (B, 3, Sh, Sw) on the device."""
        n = rows.shape[0]
        if n > self.max_batch:
            raise ValueError(f"batch {n} > max_batch {self.max_batch}")
        if not is_device(rows):
            if self._uploaded is not None:
                self._uploaded.synchronize()  # the previous upload has left the slots
            self._rows_host[:n] = rows
            self._cols_host[:n] = cols
            self._rows[:n].copy_to_device(self._rows_host[:n], stream=self.stream)
            self._cols[:n].copy_to_device(self._cols_host[:n], stream=self.stream)
            self._uploaded = cuda.event()
            self._uploaded.record(self.stream)
            rows, cols = self._rows[:n], self._cols[:n]
        out = self.out[:n]
        normalise_windows(region, rows, cols, self.norm, out, self.stream)
        return out
