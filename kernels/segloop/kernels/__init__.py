"""Pre- and post-processing kernels (``segloop.kernels``).

``pre``: uint8/uint16 HWC regions (+ halo, reflect padding by index maps) → normalised
NCHW float batch. ``post``: NCHW logits → halo cropped, uint8 labels + uint8 confidence.
Each is one per-pixel definition with two twins of the same signature: ``pre``/``post``
(CPU, numba ``@njit``) and ``pre_cuda``/``post_cuda`` (numba ``@cuda.jit`` on device
arrays; checked against the CPU twins under ``NUMBA_ENABLE_CUDASIM=1``).
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
