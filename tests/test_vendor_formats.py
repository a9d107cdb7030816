"""Vendor whole-slide formats, read region by region at every pyramid level, equal to
tifffile's own decode of the level and to OpenSlide's ``read_region``.

The files are written by tifffile's TIFF writer in each vendor's layout
(``tests/vendor_files.py``); OpenSlide, which no one here wrote, opening them as the
vendor's format (``openslide.vendor``) is the check that the layout is the vendor's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segloop.io.formats import open_image
from tests.vendor_files import (
    slide_pixels,
    write_bif,
    write_dicom,
    write_ndpi,
    write_scn,
    write_svs,
)

H, W = 600, 700
MPP = 0.25
#: regions (y0, y1, x0, x1) as fractions of a level: inside one tile, across tile
#: borders, along the right/bottom edge, the whole level
BOXES = ((0.0, 0.2, 0.0, 0.2), (0.3, 0.7, 0.25, 0.8), (0.6, 1.0, 0.5, 1.0), (0.0, 1.0, 0.0, 1.0))

#: name → (file name, writer, OpenSlide vendor, stored levels)
VENDORS = {
    "svs-jpeg": ("s.svs", lambda p, i: write_svs(p, i, MPP), "aperio", 2),
    "svs-jpeg2000": ("j.svs", lambda p, i: write_svs(p, i, MPP, compression=33005), "aperio", 2),
    # tifffile reads a file *named* .ndpi with NDPI's 64-bit offset extension, which its
    # writer cannot write: the NDPI layout and tags go into a classic TIFF named .tif
    "ndpi": ("n_ndpi.tif", lambda p, i: write_ndpi(p, i, MPP), "hamamatsu", 3),
    "scn": ("l.scn", lambda p, i: write_scn(p, i, MPP), "leica", 2),
    "bif": ("v.bif", lambda p, i: write_bif(p, i, MPP), "ventana", 3),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    d = tmp_path_factory.mktemp("vendor")
    img = slide_pixels(H, W, seed=5)
    return {k: (d / name, write(d / name, img)) for k, (name, write, _, _) in VENDORS.items()}


def _boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    return [(round(a * h), round(b * h), round(c * w), round(d * w)) for a, b, c, d in BOXES]


def _openslide_region(slide, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """OpenSlide's read of ``box`` (level pixels) of the main image (``bounds``: where
    the main image lies in a Leica collection)."""
    y0, y1, x0, x1 = box
    ds = slide.level_downsamples[level]
    bx = int(slide.properties.get("openslide.bounds-x", 0))
    by = int(slide.properties.get("openslide.bounds-y", 0))
    rgba = slide.read_region((bx + int(x0 * ds), by + int(y0 * ds)), level, (x1 - x0, y1 - y0))
    return np.asarray(rgba)[..., :3]


@pytest.mark.parametrize("vendor", VENDORS)
def test_vendor_file_reads_like_tifffile_and_openslide(files, vendor):
    openslide = pytest.importorskip("openslide", reason="pip install 'segloop[openslide]'")
    path, written = files[vendor]
    src = open_image(path)
    assert src.shape == (H, W) and src.channels == 3
    assert src.pyramid_levels == VENDORS[vendor][3]
    assert src.mpp == pytest.approx((MPP, MPP))
    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == VENDORS[vendor][2]
    with tifffile.TiffFile(path) as tif:
        series = max(tif.series, key=lambda s: np.prod(s.shape))
        for k in range(src.pyramid_levels):
            level = src.pyramid_level(k)
            assert level.mpp == pytest.approx((MPP * H / level.height, MPP * W / level.width))
            theirs = series.levels[k].asarray()
            assert level.shape == theirs.shape[:2] == written[k].shape[:2]
            for box in _boxes(*level.shape):
                y0, y1, x0, x1 = box
                ours = level.read(*box)
                np.testing.assert_array_equal(ours, theirs[y0:y1, x0:x1], f"level {k} {box}")
                # the same libjpeg / OpenJPEG decode: expect no difference
                np.testing.assert_array_equal(ours, _openslide_region(slide, k, box))
    # the image itself is what was written, to JPEG's error
    assert np.abs(src.read(0, H, 0, W).astype(int) - written[0]).mean() < 3


def test_openslide_reader_equals_tifffile(files, tmp_path):
    """The OpenSlide reader (MIRAX, VMS, …: chosen by file name) at every level equals
    the tifffile reader. No MIRAX writer exists offline: an Aperio file named .mrxs
    goes the OpenSlide way and OpenSlide reads it by its content."""
    openslide = pytest.importorskip("openslide", reason="pip install 'segloop[openslide]'")
    path = tmp_path / "slide.mrxs"
    shutil.copy(files["svs-jpeg"][0], path)
    via_openslide, via_tifffile = open_image(path), open_image(files["svs-jpeg"][0])
    quickhash = openslide.OpenSlide(str(path)).properties[openslide.PROPERTY_NAME_QUICKHASH1]
    assert via_openslide.fingerprint == quickhash  # the OpenSlide reader's identity
    assert via_openslide.mpp == pytest.approx((MPP, MPP))
    assert via_openslide.pyramid_levels == via_tifffile.pyramid_levels
    for k in range(via_tifffile.pyramid_levels):
        a, b = via_openslide.pyramid_level(k), via_tifffile.pyramid_level(k)
        for box in _boxes(*b.shape):
            np.testing.assert_array_equal(a.read(*box), b.read(*box))


def test_dicom_wsi_reads_like_wsidicom_and_openslide(tmp_path):
    """A DICOM WSI folder written by wsidicom: every level region by region equals
    wsidicom's read of the whole level and OpenSlide's (its DICOM backend)."""
    wsidicom = pytest.importorskip("wsidicom", reason="pip install 'segloop[dicom]'")
    openslide = pytest.importorskip("openslide", reason="pip install 'segloop[openslide]'")
    folder = tmp_path / "slide.dicom"
    written = write_dicom(folder, slide_pixels(300, 350, seed=6), MPP)
    src = open_image(folder)
    assert src.mpp == pytest.approx((MPP, MPP)) and src.pyramid_levels == 2
    slide = openslide.OpenSlide(str(sorted(folder.iterdir())[0]))
    assert slide.properties["openslide.vendor"] == "dicom"
    for k in range(2):
        level = src.pyramid_level(k)
        assert level.shape == written[k].shape[:2]
        # wsidicom names level k of a 2× pyramid by its scale, log2(2^k) = k
        theirs = wsidicom.WsiDicom.open(folder).read_region(
            (0, 0), k, level.shape[::-1], as_array=True
        )
        for box in _boxes(*level.shape):
            y0, y1, x0, x1 = box
            ours = level.read(*box)
            np.testing.assert_array_equal(ours, theirs[y0:y1, x0:x1], f"level {k} {box}")
            np.testing.assert_array_equal(ours, _openslide_region(slide, k, box))
