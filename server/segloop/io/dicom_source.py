"""DICOM whole-slide images (VL Whole Slide Microscopy, a folder of ``.dcm`` instances)
through wsidicom: the optional extra ``segloop[dicom]``. Region reads only
(``WsiDicom.read_region`` per pyramid level); µm/px from the level's Pixel Spacing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.io.source import ImageSource


class DicomLevel:
    """Lazy (h, w, channels) array of one pyramid level of a ``WsiDicom``."""

    def __init__(self, wsi, level) -> None:
        self.wsi, self.scale = wsi, level.level  # wsidicom names a level by log2(downsample)
        data = level.default_instance.image_data
        self.shape = (level.size.height, level.size.width, data.samples_per_pixel)
        self.dtype = np.dtype(np.uint8 if data.bits <= 8 else np.uint16)
        self.chunks = (level.tile_size.height, level.tile_size.width, data.samples_per_pixel)

    def __getitem__(self, index: tuple) -> np.ndarray:
        ys, xs, cs = index
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        region = self.wsi.read_region((x0, y0), self.scale, (x1 - x0, y1 - y0), as_array=True)
        return np.asarray(region).reshape(y1 - y0, x1 - x0, -1)[:, :, cs]


def is_dicom_folder(path: Path) -> bool:
    """A folder holding DICOM files (``DICM`` at byte 128)."""
    for f in sorted(path.iterdir())[:64]:
        if f.is_file() and f.stat().st_size > 132:
            with f.open("rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
    return False


def open_dicom(path: Path) -> ImageSource:
    """The selected pyramid of a DICOM WSI folder (level 0 and the levels above)."""
    try:
        from wsidicom import WsiDicom
    except ImportError:
        raise UserError(
            f"{path}: DICOM whole-slide images are read through wsidicom; install it with "
            "pip install 'segloop[dicom]'"
        ) from None
    try:
        wsi = WsiDicom.open(path)
        pyramid = list(wsi.levels)
        levels = [DicomLevel(wsi, lv) for lv in pyramid]
        spacing = pyramid[0].pixel_spacing  # mm/px (width, height)
        mpp = (float(spacing.height) * 1000, float(spacing.width) * 1000) if spacing else None
        series = wsi.uids.series_instance if wsi.uids else path.resolve()
    except Exception as exc:
        raise UserError(f"{path}: cannot read DICOM WSI ({type(exc).__name__}: {exc})") from exc
    fingerprint = hashlib.sha256(f"{series}{levels[0].shape}".encode()).hexdigest()
    return ImageSource(levels[0], "YXC", path, fingerprint, levels[1:], mpp)
