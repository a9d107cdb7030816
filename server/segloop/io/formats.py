"""``open_image``: which reader opens a path or URL (by content, not by name).

TIFF / BigTIFF / OME-TIFF and the TIFF-based whole-slide formats (Aperio SVS, Hamamatsu
NDPI, Leica SCN, Ventana BIF, Philips TIFF) → ``tiff``; OME-Zarr / zarr → ``zarr_source``;
a folder of DICOM WSI files → ``dicom_source`` (wsidicom, optional); MIRAX / VMS / VMU /
SVSLIDE → ``openslide_source`` (by name: a ``.mrxs`` file is a JPEG preview; optional);
PNG / JPEG → ``pillow``. Each returns an ``ImageSource`` (``source.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segloop.errors import UserError
from segloop.io import dicom_source, openslide_source, pillow, tiff, zarr_source
from segloop.io.location import Location, is_url
from segloop.io.source import ImageSource

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF


def open_image(path: str | Path, storage_options: dict[str, Any] | None = None) -> ImageSource:
    """Open TIFF/OME-TIFF (and vendor whole-slide files), OME-Zarr/zarr, DICOM WSI or
    PNG/JPEG for region reads (``storage_options``: fsspec options for a URL)."""
    if is_url(path):  # object storage: OME-Zarr / zarr or TIFF, through fsspec
        loc = Location(path, storage_options)
        if any(loc.exists(m) for m in ("zarr.json", ".zarray", ".zgroup")):
            return zarr_source.open_zarr(loc)
        if not loc.exists():
            raise UserError(f"input not found: {path}")
        with loc.fs.open(loc.url, "rb") as f:
            if f.read(4) not in TIFF_MAGIC:
                raise UserError(f"{path}: remote inputs must be TIFF/OME-TIFF or (OME-)Zarr")
        return tiff.open_tiff(loc)
    p = Path(path)
    if not p.exists():
        raise UserError(f"input not found: {p}")
    if p.is_dir():
        if any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
            return zarr_source.open_zarr(p)
        if dicom_source.is_dicom_folder(p):
            return dicom_source.open_dicom(p)
        raise UserError(
            f"{p} is a directory but neither a zarr store nor DICOM WSI; give an image file, "
            ".zarr or a folder of .dcm files"
        )
    if p.stat().st_size == 0:
        raise UserError(f"{p} is an empty file")
    if p.suffix.lower() in openslide_source.SUFFIXES:
        return openslide_source.open_openslide(p)
    with p.open("rb") as f:
        magic = f.read(8)
    if magic[:4] in TIFF_MAGIC:
        return tiff.open_tiff(p)
    if magic.startswith(b"\x89PNG") or magic.startswith(b"\xff\xd8\xff"):
        return pillow.open_pillow(p)
    raise UserError(
        f"{p} is not a supported image (TIFF, OME-TIFF, SVS, NDPI, SCN, BIF, MRXS, OME-Zarr, "
        "zarr, DICOM WSI folder, PNG, JPEG)"
    )
