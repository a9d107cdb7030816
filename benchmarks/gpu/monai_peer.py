"""Phase 6: MONAI ``sliding_window_inference`` on the same device and weights
(→ ``monai.json``).

``segloop.bench.monai.monai_segment``: overlap 0.25, gaussian blending, roi = segloop's
window (tile + 2 halo), the same batch, the same float16 channels_last module on the GPU
(``half_predictor``; MONAI moves each batch of windows to the GPU with ``sw_device``, the
stitched output stays in host memory as for whole slides), image already in memory,
output post-processed and written to the same zarr layout. One untimed warm-up on a small
image first. Named ``monai_peer`` so it does not shadow the ``monai`` package. Rehearsal:
CPU, float32 module, a tiny image.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_image
from common import rehearsal, write_phase

from segloop.bench.monai import half_predictor, monai_segment
from segloop.io.formats import open_image
from segloop.model.card import read_card
from segloop.model.weights import load_unet
from segloop.pipeline.segment import default_model
from segloop.tiling import TileGrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    cpu = rehearsal() or not torch.cuda.is_available()
    model_path = default_model()
    card = read_card(model_path)
    module = load_unet(model_path, len(card["classes"]))
    if cpu:
        predictor, sw_device = module, "cpu"
    else:
        module = module.to("cuda", memory_format=torch.channels_last).half()
        predictor, sw_device = half_predictor(module), "cuda"
    work = Path(tempfile.mkdtemp(prefix="segloop-monai-", dir=args.work))
    try:
        times = {}
        for name, size in (("warm", min(1024, args.size)), ("timed", args.size)):
            image = work / f"{name}.tif"
            make_image.write(image, size)
            src = open_image(image)
            grid = TileGrid.create(
                size, size, args.tile, card["halo"], card["input"]["multiple_of"]
            )
            times[name] = monai_segment(
                predictor, src, grid, args.batch, work / f"{name}.zarr", sw_device
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_phase(
        args.out,
        "monai",
        {
            "size": args.size,
            "tile": args.tile,
            "window": args.tile + 2 * card["halo"],
            "batch": args.batch,
            "overlap": 0.25,
            "mode": "gaussian",
            "sw_device": sw_device,
            "dtype": "float32" if cpu else "float16",
            "seconds": round(times["timed"], 3),
            "monai_mpx_s": round(args.size * args.size / times["timed"] / 1e6, 3),
        },
    )


if __name__ == "__main__":
    main()
