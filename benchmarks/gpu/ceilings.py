"""Phase 1: the device's own ceilings, measured with torch (→ ``ceilings.json``).

- ``copy_gb_s``: device-to-device copy, bytes read + written per second (the reference
  the kernels are judged against);
- ``h2d_gb_s`` / ``d2h_gb_s``: pinned host ↔ device copies (what a shard's uint8 crosses);
- ``matmul_tflop_s``: dense fp16 matrix product (``2·n³`` FLOP per product).
On a GPU: 1 GiB buffers, n = 8192. In a rehearsal: CPU tensors, 64 MiB, n = 512 in
float32 (CPU fp16 matmul is not what a GPU runs); CPU numbers, labelled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import rehearsal, torch_timer, write_phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cpu = rehearsal() or not torch.cuda.is_available()
    dev = torch.device("cpu" if cpu else "cuda")
    timed = torch_timer(dev)
    nbytes = (64 if cpu else 1024) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 5 if cpu else 20)
    result: dict = {"copy_gb_s": round(2 * nbytes / copy_s / 1e9, 1), "copy_bytes": nbytes}
    if not cpu:
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        h2d = timed(lambda: src.copy_(host, non_blocking=True), 10)
        d2h = timed(lambda: host.copy_(src, non_blocking=True), 10)
        result |= {
            "h2d_gb_s": round(nbytes / h2d / 1e9, 1),
            "d2h_gb_s": round(nbytes / d2h / 1e9, 1),
        }
    else:
        result |= {"h2d_gb_s": None, "d2h_gb_s": None}
    n, dtype = (512, torch.float32) if cpu else (8192, torch.float16)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_s = timed(lambda: a @ b, 3 if cpu else 10, warmup=1 if cpu else 3)
    result |= {
        "matmul_tflop_s": round(2 * n**3 / mm_s / 1e12, 3),
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }
    write_phase(args.out, "ceilings", result)


if __name__ == "__main__":
    main()
