"""Physical pixel size: read from each format's metadata, written into the store's
multiscales in micrometres, and the pyramid level a job segments for the model's µm/px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
import zarr
from PIL import Image

from segloop.io.formats import open_image
from segloop.io.resample import Resampled
from segloop.io.source import ImageSource
from segloop.pipeline.job import default_model
from segloop.pipeline.segment import SegmentOptions, segment
from segloop.synth import SYNTH_MPP, write_ome_tiff
from tests.conftest import assert_user_error, run_cli
from tests.vendor_files import (
    slide_pixels,
    write_bif,
    write_dicom,
    write_ndpi,
    write_scn,
    write_svs,
)

#: within 10 % of the shipped model's 0.5 µm/px: such slides are segmented at level 0
MPP = 0.48
H, W = 250, 330


def _tiff_resolution(path: Path, img: np.ndarray) -> None:
    tifffile.imwrite(path, img, photometric="rgb", tile=(128, 128),
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")  # fmt: skip


def _ome_tiff_nm(path: Path, img: np.ndarray) -> None:
    meta = {"axes": "YXS", "PhysicalSizeX": MPP * 1000, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": MPP * 1000, "PhysicalSizeYUnit": "nm"}  # fmt: skip
    tifffile.imwrite(path, img, photometric="rgb", tile=(128, 128), ome=True, metadata=meta)


def _ome_zarr_mm(path: Path, img: np.ndarray) -> None:
    """OME-Zarr 0.5 written with zarr itself, scale in millimetres (× 2 per level)."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    chw = np.moveaxis(img, -1, 0)
    for k in range(2):
        root.create_array(str(k), data=chw[:, :: 2**k, :: 2**k], chunks=(3, 128, 128),
                          dimension_names=("c", "y", "x"))  # fmt: skip
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "millimeter"} for a in "yx"
    ]
    datasets = [
        {"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, MPP / 1000 * 2**k, MPP / 1000 * 2**k]}]}
        for k in range(2)
    ]  # fmt: skip
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}


def _png_dpi(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path, dpi=(25400 / MPP, 25400 / MPP))  # pHYs, px/m


#: format → (file name, writer); vendor layouts from tests/vendor_files.py
FORMATS = {
    "tiff-resolution-cm": ("x.tif", _tiff_resolution),
    "ome-tiff-nm": ("x.ome.tif", _ome_tiff_nm),
    "aperio-svs": ("x.svs", lambda p, i: write_svs(p, i, MPP)),
    "hamamatsu-ndpi": ("x_ndpi.tif", lambda p, i: write_ndpi(p, i, MPP)),
    "leica-scn": ("x.scn", lambda p, i: write_scn(p, i, MPP)),
    "ventana-bif": ("x.bif", lambda p, i: write_bif(p, i, MPP)),
    "ome-zarr-mm": ("x.zarr", _ome_zarr_mm),
    "png-dpi": ("x.png", _png_dpi),
    "dicom-wsi": ("x.dicom", lambda p, i: write_dicom(p, i, MPP)),
}


def _multiscale(group: zarr.Group) -> dict:
    return group.attrs["ome"]["multiscales"][0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pixel_size_from_metadata_into_the_store(tmp_path, fmt):
    """Each format's pixel-size metadata → the source's µm/px → micrometre axes and
    mpp × 2^k scales on the store's image, labels and confidence (valid OME-Zarr 0.5)."""
    from ome_zarr_models.v05.image import Image as OmeImage
    from ome_zarr_models.v05.image_label import ImageLabel

    name, write = FORMATS[fmt]
    if fmt == "dicom-wsi":
        pytest.importorskip("wsidicom", reason="pip install 'segloop[dicom]'")
    path = tmp_path / name
    write(path, slide_pixels(H, W))
    src = open_image(path)
    assert src.mpp == pytest.approx((MPP, MPP), rel=1e-4)
    out = tmp_path / "out.zarr"
    summary = segment(path, out, SegmentOptions(copy_image=True, threads=1))
    assert summary["pixel_size"] == {
        "mpp": pytest.approx([MPP, MPP], rel=1e-4),
        "model_mpp": SYNTH_MPP,
        "source_level": 0,
        "resampled": False,
    }
    root = zarr.open_group(out, mode="r")
    for group in (root, root["labels/segmentation"], root["confidence"]):
        ms = _multiscale(group)
        assert [a.get("unit") for a in ms["axes"] if a["type"] == "space"] == ["micrometer"] * 2
        for k, ds in enumerate(ms["datasets"]):
            scale = ds["coordinateTransformations"][0]["scale"][-2:]
            assert scale == pytest.approx([MPP * 2**k] * 2, rel=1e-4)
    assert root["labels/segmentation/0"].shape == (H, W)
    OmeImage.from_zarr(root)
    ImageLabel.from_zarr(root["labels/segmentation"])
    OmeImage.from_zarr(root["confidence"])


def test_unknown_pixel_sizes(tmp_path):
    """No unit, or a screen/print resolution (72 or 300 dpi, per inch or per cm), is no
    physical pixel size."""
    img = slide_pixels(64, 64)
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(72, 72), resolutionunit="INCH")
    per_cm = {"resolution": (118.11, 118.11), "resolutionunit": "CENTIMETER"}  # 300 dpi
    tifffile.imwrite(tmp_path / "dpcm.tif", img, **per_cm)
    Image.fromarray(img).save(tmp_path / "dpi.png", dpi=(300, 300))
    tifffile.imwrite(tmp_path / "plain.tif", img)
    for f in ("dpi.tif", "dpcm.tif", "dpi.png", "plain.tif"):
        assert open_image(tmp_path / f).mpp is None, f
    root = zarr.open_group(tmp_path / "px.zarr", mode="w", zarr_format=3)
    root.create_array("0", data=img[..., 0], dimension_names=("y", "x"))
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [0.5, 0.5]}]}]}]}  # fmt: skip
    assert open_image(tmp_path / "px.zarr").mpp is None


def _labels(store: Path) -> np.ndarray:
    return zarr.open_array(store / "labels/segmentation/0", mode="r")[...]


def test_40x_slide_with_20x_model_segments_level_1(tmp_path):
    """A 0.25 µm/px slide (levels 0.25, 0.5, 1.0) and the 0.5 µm/px model: level 1 is
    segmented as stored, and the labels equal those of level 1 given as its own image."""
    slide = tmp_path / "40x.ome.tif"
    write_ome_tiff(slide, 1024, 768, seed=3, tile=256, compression="zlib", mpp=0.25)
    out = tmp_path / "40x.zarr"
    summary = segment(slide, out, SegmentOptions(threads=1))
    assert summary["pixel_size"]["source_level"] == 1
    assert not summary["pixel_size"]["resampled"]
    assert summary["image"] == {"mode": "copy"}  # a viewer in place would show level 0
    root = zarr.open_group(out, mode="r")
    ds0 = _multiscale(root["labels/segmentation"])["datasets"][0]
    assert ds0["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    level1 = tifffile.imread(slide, series=0, level=1)
    np.testing.assert_array_equal(np.moveaxis(root["0"][...], 0, -1), level1)
    alone = tmp_path / "level1.tif"
    tifffile.imwrite(alone, level1, photometric="rgb", tile=(256, 256),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    segment(alone, tmp_path / "alone.zarr", SegmentOptions(threads=1))
    np.testing.assert_array_equal(_labels(out), _labels(tmp_path / "alone.zarr"))


def test_4x_pyramid_is_resampled_to_the_models_pixel_size(tmp_path):
    """Aperio levels 0.25 and 1.0 µm/px, model 0.5: both are 2× off, the finer one is
    taken and resampled to 0.5; the store holds that image and its labels at 0.5."""
    svs = tmp_path / "40x.svs"
    write_svs(svs, slide_pixels(512, 640), 0.25)
    out = tmp_path / "svs.zarr"
    summary = segment(svs, out, SegmentOptions(threads=1))
    assert summary["pixel_size"] == {
        "mpp": [0.5, 0.5], "model_mpp": 0.5, "source_level": 0, "resampled": True,
    }  # fmt: skip
    root = zarr.open_group(out, mode="r")
    assert _labels(out).shape == (256, 320)
    expected = Resampled(open_image(svs), (0.5, 0.5))[:, :, slice(None)]
    np.testing.assert_array_equal(np.moveaxis(root["0"][...], 0, -1), expected)


def test_resampled_regions_agree_with_the_whole_and_align_centres():
    """Regions of a resampled source equal the same pixels of the whole resampled at once
    (down and up); a ramp downsampled 2× lands on the mean of each pixel pair."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (301, 257, 3), dtype=np.uint8)
    src = ImageSource(img, "YXS", Path("mem"), "x", mpp=(0.25, 0.25))
    for mpp in ((0.5, 0.5), (0.2, 0.3)):
        r = Resampled(src, mpp)
        whole = r[:, :, slice(None)]
        assert whole.shape == (round(301 * 0.25 / mpp[0]), round(257 * 0.25 / mpp[1]), 3)
        for y0, y1, x0, x1 in ((0, 40, 0, 33), (17, 90, 50, 120), (100, r.shape[0], 3, r.shape[1])):
            np.testing.assert_array_equal(r[y0:y1, x0:x1, slice(None)], whole[y0:y1, x0:x1])
    ramp = np.tile((np.arange(256) * 2 % 256).astype(np.uint8)[:120], (40, 1))
    half = Resampled(ImageSource(ramp, "YX", Path("ramp"), "r", mpp=(1.0, 1.0)), (2.0, 2.0))
    np.testing.assert_array_equal(half[:, 4:56, 0][10], 4 * np.arange(4, 56) + 1)


@pytest.fixture(scope="module")
def model_without_mpp(tmp_path_factory) -> Path:
    """The shipped network under another name whose card states no pixel size."""
    proto = onnx.load(str(default_model()))
    for entry in proto.metadata_props:
        if entry.key == "name":
            entry.value = json.dumps("no_mpp")
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mpp", "null"
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save(proto, str(path))
    return path


def test_neither_side_knows_refused_then_mpp_given(tmp_path, model_without_mpp):
    """A PNG without a resolution and a model without mpp: one line asks for --mpp;
    with --mpp the store states it."""
    png = tmp_path / "x.png"
    Image.fromarray(slide_pixels(200, 240)).save(png)
    out = tmp_path / "x.zarr"
    proc = run_cli("segment", png, "-o", out, "--model", model_without_mpp, "--quiet")
    assert_user_error(proc, "pixel size", "--mpp")
    proc = run_cli("segment", png, "-o", out, "--model", model_without_mpp, "--mpp", "0.3",
                   "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ms = _multiscale(zarr.open_group(out / "labels/segmentation", mode="r"))
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.3, 0.3]
