"""Readers: every supported format, dtype and channel layout reads back exactly by region."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from segloop.io.formats import open_image
from segloop.io.tiff_level import TiffLevel

rng = np.random.default_rng(0)
H, W = 301, 257  # odd sizes on purpose


def _img(channels: int, dtype) -> np.ndarray:
    hi = 255 if dtype == np.uint8 else 65535
    shape = (H, W) if channels == 1 else (H, W, channels)
    return rng.integers(0, hi, shape, dtype=dtype, endpoint=True)


def _check(path, expected: np.ndarray) -> None:
    src = open_image(path)
    exp = expected if expected.ndim == 3 else expected[..., None]
    assert src.shape == exp.shape[:2]
    assert src.channels == exp.shape[2]
    assert src.dtype == exp.dtype
    assert np.array_equal(src.read(0, H, 0, W), exp)
    assert np.array_equal(src.read(37, 200, 101, 256), exp[37:200, 101:256])
    th, tw = src.block_shape or (H, W)  # exactly one stored tile/strip: a new array
    if 2 * th <= H and tw <= W:
        whole = src.read(th, 2 * th, 0, tw)
        assert np.array_equal(whole, exp[th : 2 * th, :tw])
        whole[...] = 0
        assert np.array_equal(src.read(th, 2 * th, 0, tw), exp[th : 2 * th, :tw])


@pytest.mark.parametrize("compression", ["zlib", "lzw", "zstd", None])
@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize(
    ("channels", "dtype"),
    [(1, np.uint8), (3, np.uint8), (4, np.uint8), (3, np.uint16), (1, np.uint16)],
)
def test_tiff_lossless(tmp_path, compression, tiled, channels, dtype):
    img = _img(channels, dtype)
    f = tmp_path / "x.tif"
    kw = {"tile": (64, 64)} if tiled else {"rowsperstrip": 50}
    photometric = {1: "minisblack", 3: "rgb", 4: "rgb"}[channels]
    extrasamples = ["unassalpha"] if channels == 4 else None
    tifffile.imwrite(
        f,
        img,
        compression=compression,
        photometric=photometric,
        extrasamples=extrasamples,
        bigtiff=tiled,
        **kw,
    )
    _check(f, img)


def test_tiff_jpeg_and_pyramid(tmp_path):
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    f = tmp_path / "p.ome.tif"
    with tifffile.TiffWriter(f, bigtiff=True) as tw:
        tw.write(img, subifds=1, tile=(64, 64), compression="jpeg", photometric="rgb")
        tw.write(img[::2, ::2], subfiletype=1, tile=(64, 64), compression="jpeg", photometric="rgb")
    src = open_image(f)
    assert src.shape == (H, W)  # level 0 of the pyramid
    ref = tifffile.imread(f)
    assert np.array_equal(src.read(10, 90, 20, 200), ref[10:90, 20:200])
    # every level of a local file is decoded by TiffLevel (no zarr), tile by tile, to
    # the pixels tifffile's own zarr store gives, across tile borders and image edges
    store = zarr.open_group(tifffile.imread(f, aszarr=True, level=None), mode="r")
    for k in range(2):
        level = src.pyramid_level(k)
        assert isinstance(level._array, TiffLevel)
        want = np.asarray(store[str(k)])
        h, w = want.shape[:2]
        for y0, y1, x0, x1 in ((0, h, 0, w), (63, 65, 0, w), (5, h, 127, w), (64, 128, 64, 128)):
            assert np.array_equal(level.read(y0, y1, x0, x1), want[y0:y1, x0:x1])


def test_striped_full_width_decodes_each_strip_once(tmp_path):
    """A full-width strip is one block of the job's cache: three regions across it
    decode it once, and it is not a viewer-servable source (its store copies the image)."""
    from segloop.pipeline.read import BlockCache

    img = rng.integers(0, 255, (600, 1500, 3), dtype=np.uint8)
    f = tmp_path / "s.tif"
    tifffile.imwrite(f, img, rowsperstrip=600, photometric="rgb", compression="zlib")
    src = open_image(f)
    assert src.block_shape == (600, 1500) and not src.servable
    boxes = [(0, 300, x0, x0 + 500) for x0 in (0, 500, 1000)]
    cache = BlockCache(src, boxes)
    for b in boxes:
        assert np.array_equal(cache.read(b), img[:300, b[2] : b[3]])
    assert dict(cache.decodes) == {(0, 0): 1}


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pillow(tmp_path, fmt, mode):
    if fmt == "jpeg" and mode == "RGBA":
        pytest.skip("JPEG has no alpha")
    img = _img({"L": 1, "RGB": 3, "RGBA": 4}[mode], np.uint8)
    f = tmp_path / f"x.{fmt}"
    Image.fromarray(img, mode).save(f)
    expected = np.asarray(Image.open(f))  # JPEG is lossy: compare with its own decode
    _check(f, expected)


def test_png_uint16(tmp_path):
    img = _img(1, np.uint16)
    f = tmp_path / "x.png"
    Image.fromarray(img).save(f)
    _check(f, img)


def test_ome_zarr_05(tmp_path):
    img = _img(3, np.uint8)
    g = zarr.open_group(tmp_path / "i.zarr", mode="w", zarr_format=3)
    g.create_array(
        "0", data=np.moveaxis(img, -1, 0), chunks=(3, 64, 64), dimension_names=("c", "y", "x")
    )
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}],
                    }
                ],
            }
        ],
    }
    _check(tmp_path / "i.zarr", img)


def test_ome_zarr_04_v2(tmp_path):
    img = _img(1, np.uint16)
    g = zarr.open_group(tmp_path / "i.zarr", mode="w", zarr_format=2)
    g.create_array("0", data=img[None, None], chunks=(1, 1, 64, 64))
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "t", "type": "time"},
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ],
            "datasets": [{"path": "0"}],
        }
    ]
    _check(tmp_path / "i.zarr", img)


@pytest.mark.parametrize("layout", ["yx", "yxc", "cyx"])
def test_plain_zarr(tmp_path, layout):
    img = _img(1 if layout == "yx" else 3, np.uint8)
    data = np.moveaxis(img, -1, 0) if layout == "cyx" else img
    zarr.create_array(tmp_path / "a.zarr", data=data, chunks=(3, 64, 64)[-data.ndim :])
    _check(tmp_path / "a.zarr", img)
