"""CUDA pre/post kernel throughput against the device's own copy bandwidth.

- copy: device-to-device copy of a buffer as large as the pre kernel's traffic (GB/s)
- pre: a batch of uint8 HWC windows → normalised float16 NCHW (bytes read + written / s)
- post: float16 logits (B, K, S, S) → uint8 labels + confidence of the core (same)

Target (issue 7): each kernel ≥ 70 % of the copy bandwidth. Times are CUDA events around
``--repeat`` launches after a warm-up. ``--small`` runs tiny shapes, e.g. under
``NUMBA_ENABLE_CUDASIM=1`` to check the script itself without a GPU (its numbers then mean
nothing). Writes ``kernels.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from numba import cuda

from segloop.kernels import post_cuda, pre_cuda
from segloop.kernels.pre import Normalisation, reflect_index


def timed(fn, repeat: int) -> float:
    """Seconds per call (CUDA events; one warm-up call first)."""
    fn()
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=1024, help="core side; window = tile + 2 halo")
    ap.add_argument("--halo", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (simulator check)")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.small:
        args.batch, args.tile, args.halo, args.repeat = 2, 16, 8, 1
    b, s, core = args.batch, args.tile + 2 * args.halo, args.tile
    rng = np.random.default_rng(0)
    norm = Normalisation((0.5,) * 3, (0.25,) * 3, (0, 1, 2), 255.0)
    regions = [cuda.to_device(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for _ in range(b)]
    index = cuda.to_device(reflect_index(0, s, s))
    indices = [(index, index)] * b
    pre_s = timed(lambda: pre_cuda.normalise_batch(regions, indices, norm, np.float16), args.repeat)
    pre_bytes = b * s * s * 3 * (1 + 2)  # uint8 in, float16 out
    logits = cuda.to_device(rng.standard_normal((b, 3, s, s)).astype(np.float16))
    post_s = timed(lambda: post_cuda.labels_confidence(logits, args.halo, core), args.repeat)
    post_bytes = b * 3 * s * s * 2 + b * core * core * 2  # float16 in, 2 × uint8 out
    src = cuda.device_array(pre_bytes // 2, np.uint8)
    dst = cuda.device_array(pre_bytes // 2, np.uint8)
    copy_s = timed(lambda: dst.copy_to_device(src), args.repeat)
    rates = {  # GB/s; None where the timer says 0 (the simulator's timings are bogus)
        name: round(n / t / 1e9, 1) if t > 0 else None
        for name, n, t in (
            ("copy", pre_bytes, copy_s),  # read + write of pre_bytes / 2: the same traffic
            ("pre", pre_bytes, pre_s),
            ("post", post_bytes, post_s),
        )
    }
    result = {
        "device": "simulator" if args.small else cuda.get_current_device().name.decode(),
        "host": platform.node(),
        "batch": b,
        "window": s,
        "core": core,
        **{f"{k}_gb_s": v for k, v in rates.items()},
    }
    for k in ("pre", "post"):
        ok = rates[k] is not None and rates["copy"]
        result[f"{k}_vs_copy"] = round(rates[k] / rates["copy"], 3) if ok else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
