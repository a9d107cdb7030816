"""Pre- and post-processing kernels (``segloop.kernels``).

``pre``: uint8/uint16 HWC regions (+ halo, reflect padding by index maps) → normalised
NCHW float batch. ``post``: NCHW logits → halo cropped, uint8 labels + uint8 confidence.
Each is one per-pixel definition; this package holds the CPU (numba ``@njit``) versions,
whose signatures the CUDA versions share.
"""
