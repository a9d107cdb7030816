"""Whole-slide formats that only OpenSlide reads (MIRAX ``.mrxs``, Hamamatsu ``.vms`` /
``.vmu``, Sakura ``.svslide``), through openslide-python and the ``openslide-bin`` wheel:
the optional extra ``segloop[openslide]``. Region reads only (``OpenSlide.read_region``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.io.source import ImageSource, file_fingerprint

#: file names (lower case) that open_image hands to OpenSlide
SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
#: chunk side (px) for levels whose tile size OpenSlide does not report
CHUNK = 512


class OpenSlideLevel:
    """Lazy (h, w, 3) uint8 array of one OpenSlide level. OpenSlide returns RGBA with
    transparent pixels where nothing was scanned: composited onto the slide's background
    colour (white when it states none)."""

    def __init__(self, slide, level: int) -> None:
        import openslide

        self.slide, self.level = slide, level
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.downsample = slide.level_downsamples[level]
        props = slide.properties
        tile = [
            int(props.get(f"openslide.level[{level}].tile-{d}", CHUNK)) for d in ("height", "width")
        ]
        self.chunks = (*tile, 3)
        bg = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        self._background = np.array([int(bg[i : i + 2], 16) for i in (0, 2, 4)], np.uint16)

    def __getitem__(self, index: tuple) -> np.ndarray:
        ys, xs, cs = index
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        # read_region takes the top-left corner in level-0 pixels
        corner = (int(x0 * self.downsample), int(y0 * self.downsample))
        rgba = np.asarray(self.slide.read_region(corner, self.level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:].astype(np.uint16)
        rgb = (rgba[..., :3] * alpha + self._background * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)[:, :, cs]


def open_openslide(path: Path) -> ImageSource:
    """Level 0 and the pyramid of a slide OpenSlide opens; µm/px from
    ``openslide.mpp-y`` / ``openslide.mpp-x``; fingerprint: OpenSlide's quickhash1."""
    try:
        import openslide
    except ImportError:
        raise UserError(
            f"{path}: this whole-slide format is read through OpenSlide; install it with "
            "pip install 'segloop[openslide]'"
        ) from None
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, ValueError) as exc:
        raise UserError(f"{path}: OpenSlide cannot open it ({exc})") from exc
    props = slide.properties
    mpp = None
    if openslide.PROPERTY_NAME_MPP_X in props and openslide.PROPERTY_NAME_MPP_Y in props:
        mpp = (
            float(props[openslide.PROPERTY_NAME_MPP_Y]),
            float(props[openslide.PROPERTY_NAME_MPP_X]),
        )
    levels = [OpenSlideLevel(slide, k) for k in range(slide.level_count)]
    fingerprint = props.get(openslide.PROPERTY_NAME_QUICKHASH1) or file_fingerprint(path)
    return ImageSource(levels[0], "YXC", path, fingerprint, levels[1:], mpp)
