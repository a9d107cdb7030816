"""The MONAI peer pipeline: ``sliding_window_inference`` on the whole image in memory.

Its recommended settings (overlap 0.25, gaussian blending), roi = our window (tile + 2
halo), our batch size; the output goes through the same post-processing into the same
zarr layout. ``python -m segloop.bench.monai IMAGE OUT`` runs it once in a fresh process
(so its peak RSS can be measured on its own).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segloop.io.ome_zarr import OutputStore, remove_store
from segloop.io.source import ImageSource
from segloop.kernels.post import labels_confidence
from segloop.pipeline.stages import peak_rss_mb
from segloop.tiling import TileGrid


def monai_segment(
    predictor: Callable, src: ImageSource, grid: TileGrid, batch: int, out: Path,
    sw_device: str = "cpu",
) -> float:  # fmt: skip
    """Segment ``src`` with MONAI into ``out``; returns seconds (image already in memory).
    ``sw_device="cuda"``: MONAI moves each batch of windows to the GPU; the stitched output
    stays in host memory (``device="cpu"``), as MONAI's users run whole slides."""
    import torch
    from monai.inferers import sliding_window_inference

    remove_store(out)  # repeated rounds reuse the folder; not part of the timing
    rgb = src.read(0, src.height, 0, src.width)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    x = (x - 0.5) / 0.25
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=(grid.tile + 2 * grid.halo,) * 2,  # one chunk + halo, as MONAI users
            sw_batch_size=batch,
            predictor=predictor,
            overlap=0.25,
            mode="gaussian",
            sw_device=sw_device,
            device="cpu",
        )
        labels, conf = labels_confidence(logits.numpy(), 0, src.height)
        store = OutputStore.create(out, grid, src.channels, src.dtype, copy_image=False)
        box = (0, src.height, 0, src.width)
        store.write("segmentation", 0, box, labels[0])
        store.write("confidence", 0, box, conf[0])
    return time.perf_counter() - t0


def half_predictor(module) -> Callable:
    """MONAI predictor for a float16 channels_last module on the GPU (float32 windows in,
    float32 logits out), as ``TorchRuntime(device="cuda")`` holds it."""
    import torch

    def predict(t):
        return module(t.half().contiguous(memory_format=torch.channels_last)).float()

    return predict


def ort_predictor(rt) -> Callable:
    """MONAI predictor calling a segloop runtime (the same session segloop uses)."""
    import torch

    def predict(t):
        return torch.from_numpy(rt.run(np.ascontiguousarray(t.numpy())))

    return predict


def main() -> None:
    import torch

    from segloop.io.formats import open_image
    from segloop.pipeline.segment import default_model
    from segloop.runtimes import create_runtime

    p = argparse.ArgumentParser(prog="python -m segloop.bench.monai")
    p.add_argument("image", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    src = open_image(a.image)
    rt = create_runtime("onnx", default_model(), a.threads)
    grid = TileGrid.create(
        src.height, src.width, a.tile, rt.card["halo"], rt.card["input"]["multiple_of"]
    )
    seconds = monai_segment(ort_predictor(rt), src, grid, a.batch, a.out)
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
