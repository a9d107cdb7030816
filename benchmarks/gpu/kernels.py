"""Phase 2: the CUDA pre/post kernels in GB/s against the device's own copy bandwidth
(→ ``kernels.json``).

- copy: numba device-to-device copy of a buffer half as large as the pre kernel's
  traffic, counted read + written (the same bytes moved);
- pre: ``pre_cuda.WindowNormaliser`` on B windows cut from one device shard region,
  uint8 HWC → float16 NCHW; bytes = B·Sh·Sw·(3 read + 3·2 written);
- post: ``post_cuda.windows_into``, float16 logits (B, 3, Sh, Sw) → uint8 labels +
  confidence of the cores in a shard buffer; bytes = B·core²·(3·2 read + 2 written);
- uncertainty: ``post_cuda.tile_uncertainty`` over the shard's confidence (1 B/px read).

Target (issue 15): pre and post ≥ 0.7 of copy. Times: CUDA events around ``--repeat``
launches after a warm-up. ``--small`` (and every rehearsal) runs tiny shapes under
``NUMBA_ENABLE_CUDASIM=1``: the simulator's rates are timed with perf_counter and say
nothing about a GPU (labelled ``device: simulator``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, write_phase

from segloop.kernels import post_cuda, pre_cuda
from segloop.kernels.pre import Normalisation, reflect_index

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def timed(fn, repeat: int) -> float:
    """Seconds per call: CUDA events on a GPU, perf_counter under the simulator."""
    fn()
    cuda.synchronize()
    if SIMULATED:
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / 1000 / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tile", type=int, default=1024, help="core side; window = tile + 2 halo")
    ap.add_argument("--halo", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (simulator check)")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.small or SIMULATED:
        args.batch, args.tile, args.halo, args.repeat = 2, 16, 8, 1
    b, core, halo = args.batch, args.tile, args.halo
    s = core + 2 * halo
    rng = np.random.default_rng(0)
    norm = Normalisation((0.5,) * 3, (0.25,) * 3, (0, 1, 2), 255.0)
    # one shard region two windows on a side; windows start anywhere inside it
    side = 2 * s
    region = cuda.to_device(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    starts = rng.integers(-halo, side - s + halo, (b, 2))
    rows = np.stack([reflect_index(int(y), s, side) for y, _ in starts]).astype(np.int32)
    cols = np.stack([reflect_index(int(x), s, side) for _, x in starts]).astype(np.int32)
    pre = pre_cuda.WindowNormaliser(norm, b, (s, s), np.float16)
    d_rows, d_cols = cuda.to_device(rows), cuda.to_device(cols)
    pre_s = timed(lambda: pre(region, d_rows, d_cols), args.repeat)
    pre_bytes = b * s * s * (3 + 3 * 2)

    logits = cuda.to_device(rng.standard_normal((b, 3, s, s)).astype(np.float16))
    per_row = int(np.ceil(np.sqrt(b)))
    shard = (per_row * core, per_row * core)
    origins = np.array([((i // per_row) * core, (i % per_row) * core) for i in range(b)])
    sizes = np.full((b, 2), core)
    post = post_cuda.ShardPost(shard, core, b)
    d_origins = cuda.to_device(origins.astype(np.int32))
    d_sizes = cuda.to_device(sizes.astype(np.int32))
    post_s = timed(lambda: post.windows(logits, halo, d_origins, d_sizes), args.repeat)
    post_bytes = b * core * core * (3 * 2 + 2)
    unc_s = timed(lambda: post.finish(shard), args.repeat)
    unc_bytes = shard[0] * shard[1]

    src = cuda.device_array(pre_bytes // 2, np.uint8)
    dst = cuda.device_array(pre_bytes // 2, np.uint8)
    copy_s = timed(lambda: dst.copy_to_device(src), args.repeat)
    rates = {
        name: float(f"{n / t / 1e9:.4g}")
        for name, n, t in (
            ("copy", pre_bytes, copy_s),  # read + write of pre_bytes / 2: the same traffic
            ("pre", pre_bytes, pre_s),
            ("post", post_bytes, post_s),
            ("uncertainty", unc_bytes, unc_s),
        )
    }
    result = {
        "kernel_device": "simulator" if SIMULATED else device_name(),
        "batch": b,
        "window": s,
        "core": core,
        "seconds": {"pre": pre_s, "post": post_s, "uncertainty": unc_s, "copy": copy_s},
        **{f"{k}_gb_s": v for k, v in rates.items()},
        "pre_vs_copy": float(f"{rates['pre'] / rates['copy']:.3g}"),
        "post_vs_copy": float(f"{rates['post'] / rates['copy']:.3g}"),
        "pre_mpx_s": float(f"{b * s * s / pre_s / 1e6:.4g}"),
        "post_mpx_s": float(f"{b * core * core / post_s / 1e6:.4g}"),
    }
    write_phase(args.out, "kernels", result)


if __name__ == "__main__":
    main()
