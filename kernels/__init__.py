"""Pre- and post-processing kernels (``segloop.kernels``).

``pre``: uint8/uint16 HWC regions (+ halo, reflect padding by index maps) → normalised
NCHW float batch. ``post``: NCHW logits → halo cropped, uint8 labels + uint8 confidence.
Each is one per-pixel definition; this package holds the CPU (numba ``@njit``) versions,
whose signatures the CUDA versions share.
"""

from __future__ import annotations

import contextlib
import importlib
import threading


def _threadsafe_layer() -> bool:
    """True if numba can use TBB or OpenMP, whose pools accept launches from many threads."""
    for module in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


#: held around every ``parallel=True`` kernel launch. The pipeline calls pre and post from
#: different threads at once; numba's fallback "workqueue" layer aborts the process on
#: concurrent launches, so without TBB/OpenMP the launches are serialised.
PARALLEL_LAUNCH = contextlib.nullcontext() if _threadsafe_layer() else threading.Lock()
