"""PNG and JPEG through Pillow (these formats are not tiled: decoded once, whole)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segloop.errors import UserError
from segloop.io.pixel_size import from_ppi
from segloop.io.source import ImageSource, file_fingerprint

_MODES = {"L": "YX", "RGB": "YXS", "RGBA": "YXS", "I;16": "YX", "I;16B": "YX"}


def open_pillow(path: Path) -> ImageSource:
    try:
        with Image.open(path) as im:
            if im.mode not in _MODES:
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            array = np.asarray(im)
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("="))
            mode = im.mode
            dpi = im.info.get("dpi")  # PNG pHYs / JPEG JFIF density, as px/inch
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: too large for PNG/JPEG decoding; convert to tiled TIFF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc})") from exc
    mpp = from_ppi(float(dpi[1]), float(dpi[0])) if dpi and min(dpi) > 0 else None
    return ImageSource(array, _MODES.get(mode, "YXS"), path, file_fingerprint(path), mpp=mpp)
