"""Phase 3: model-only throughput, the ceiling end to end is judged against
(→ ``model.json``).

``TorchRuntime.run_device`` (the runtime the device pipeline calls: the ONNX file's
weights, float16, channels_last) on windows of tile + 2 halo already on the device;
eager, and with ``graphs=True`` (one CUDA graph captured per batch shape, replayed), at
batch 8, 16 and 32. Rate =
output (core) Mpx/s, as every segloop benchmark counts. In a rehearsal: CPU torch,
float32 eager, tiny windows and batches; the graphed rows are null (CUDA graphs need a
GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import rehearsal, torch_timer, write_phase

from segloop.model.card import read_card
from segloop.pipeline.segment import default_model
from segloop.runtimes.torch import TorchRuntime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    cpu = rehearsal() or not torch.cuda.is_available()
    if cpu:
        args.tile, args.batches, args.repeat = 64, "1,2", 2
    dev = torch.device("cpu" if cpu else "cuda")
    model_path = default_model()
    card = read_card(model_path)
    window = args.tile + 2 * card["halo"]
    device = "cpu" if cpu else "cuda"
    eager = TorchRuntime(model_path, os.cpu_count() or 1, device=device)
    graphed = None if cpu else TorchRuntime(model_path, eager.threads, device=device, graphs=True)
    dtype = torch.float32 if cpu else torch.float16
    timed = torch_timer(dev)
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, 3, window, window, device=dev, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        px = b * args.tile * args.tile
        eager_s = timed(lambda x=x: eager.run_device(x), args.repeat, warmup=1 if cpu else 3)
        graph_s = None
        if graphed is not None:  # the first call captures the graph (in the warm-up)
            graph_s = timed(lambda x=x: graphed.run_device(x), args.repeat, warmup=2)
        rows.append(
            {
                "batch": b,
                "eager_mpx_s": round(px / eager_s / 1e6, 3),
                "graphed_mpx_s": round(px / graph_s / 1e6, 3) if graph_s else None,
            }
        )
        print(f"[model] {rows[-1]}", flush=True)
    best = max(max(r["eager_mpx_s"], r["graphed_mpx_s"] or 0) for r in rows)
    write_phase(
        args.out,
        "model",
        {
            "dtype": str(dtype).removeprefix("torch."),
            "tile": args.tile,
            "window": window,
            "rows": rows,
            "model_only_mpx_s": best,
        },
    )


if __name__ == "__main__":
    main()
