"""Synthetic histology with exact ground truth (``segloop synth``).

Pixel size convention: level 0 of a synthetic slide is ``SYNTH_MPP`` = 0.5 µm/px (a 20×
scan: nuclei of ~5–13 µm are ~10–26 px across, as rendered); the OME-TIFF states it
(PhysicalSizeX/Y, and the TIFF resolution tags), and the shipped model, trained on these
slides, is a 0.5 µm/px model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from segloop.synth.render import CLASS_NAMES, STAIN_MODES, od_to_rgb, render_region

__all__ = ["CLASS_NAMES", "STAIN_MODES", "SYNTH_MPP", "render", "write_ome_tiff"]

#: µm/px of a synthetic slide's level 0 (and of the images the shipped model learnt from)
SYNTH_MPP = 0.5

_BLUR_SIGMA = 0.9  # optical blur at level 0 (px)
_MARGIN = 4


def render(
    y0: int, x0: int, h: int, w: int, *, seed: int = 0, stain: str = "he", step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Render a region at level-0 origin (y0, x0), sampling every ``step`` pixels.

    Returns (rgb (h, w, 3) uint8, truth (h, w) uint8). Regions rendered separately
    agree exactly with one rendered at once (the blur uses a margin).
    """
    m = _MARGIN if step == 1 else 0
    od = np.empty((h + 2 * m, w + 2 * m, 3), np.float32)
    truth = np.empty((h + 2 * m, w + 2 * m), np.uint8)
    render_region(seed, STAIN_MODES[stain], y0 - m * step, x0 - m * step, step, od, truth)
    if m:
        # here, not at module level: every job reads the model card, which imports this
        # package for its class names; scipy.ndimage alone takes 0.4 s to import
        from scipy.ndimage import gaussian_filter

        od = gaussian_filter(od, sigma=(_BLUR_SIGMA, _BLUR_SIGMA, 0), mode="nearest")
        od, truth = od[m:-m, m:-m], truth[m:-m, m:-m]
    rgb = np.empty((h, w, 3), np.uint8)
    od_to_rgb(seed, y0, x0, step, np.ascontiguousarray(od), rgb)
    return rgb, np.ascontiguousarray(truth)


def _levels(h: int, w: int, tile: int) -> int:
    n = 1
    while max(h, w) >> n >= tile:
        n += 1
    return n


def write_ome_tiff(
    path: Path,
    height: int,
    width: int,
    *,
    seed: int = 0,
    stain: str = "he",
    truth_path: Path | None = None,
    tile: int = 512,
    compression: str = "jpeg",
    progress=None,
    mpp: float = SYNTH_MPP,
) -> None:
    """Write a tiled, pyramidal OME-TIFF tile by tile (memory: a few tiles).

    Pyramid levels are SubIFDs rendered at stride 2**k. ``truth_path`` gets the level-0
    classes as a zlib-compressed tiled TIFF, written from the same render pass. ``mpp``:
    the level-0 µm/px the file states (the content is rendered the same whatever it is).
    """
    n_levels = _levels(height, width, tile)
    truth_q: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=16)

    def tiles(level: int) -> Iterator[np.ndarray]:
        step = 1 << level
        lh, lw = -(-height // step), -(-width // step)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                rgb, truth = render(
                    ty * step, tx * step, tile, tile, seed=seed, stain=stain, step=step
                )
                if level == 0 and truth_path is not None:
                    truth_q.put(truth)
                if progress is not None and level == 0:
                    progress(tile * tile)
                yield rgb

    def write_truth() -> None:
        def it() -> Iterator[np.ndarray]:
            while (t := truth_q.get()) is not None:
                yield t

        with tifffile.TiffWriter(truth_path, bigtiff=True) as tw:
            tw.write(
                it(),
                shape=(height, width),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="zlib",
                photometric="minisblack",
            )

    writer = None
    if truth_path is not None:
        writer = threading.Thread(target=write_truth, daemon=True)
        writer.start()
    opts = dict(tile=(tile, tile), compression=compression, photometric="rgb")
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    try:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            tw.write(
                tiles(0),
                shape=(height, width, 3),
                dtype=np.uint8,
                subifds=n_levels - 1,
                metadata={
                    "axes": "YXS",
                    "PhysicalSizeX": mpp,
                    "PhysicalSizeY": mpp,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeYUnit": "µm",
                },
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                **opts,
            )
            for level in range(1, n_levels):
                shape = (-(-height >> level), -(-width >> level), 3)
                ppcm = 1e4 / (mpp * (1 << level))
                tw.write(
                    tiles(level),
                    shape=shape,
                    dtype=np.uint8,
                    subfiletype=1,
                    resolution=(ppcm, ppcm),
                    resolutionunit="CENTIMETER",
                    **opts,
                )
    finally:
        if writer is not None:
            truth_q.put(None)
            writer.join()
