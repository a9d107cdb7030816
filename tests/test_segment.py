"""`segloop segment` end to end: exact tiling, model quality, the store, stats, resume."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import zarr

from segloop.scores import iou
from tests.conftest import assert_user_error, read_store, run_cli


@pytest.fixture(scope="session")
def stores(slide, tmp_path_factory):
    """The test slide segmented with several tile sizes (and as one tile), via the CLI."""
    d = tmp_path_factory.mktemp("stores")
    cache: dict[str, Path] = {}

    def get(tile: str, *extra: str) -> Path:
        key = "_".join((tile, *extra)).replace("-", "")
        if key not in cache:
            out = d / f"t{key}.zarr"
            proc = run_cli("segment", slide[0], "-o", out, "--tile", tile, "--quiet", *extra)
            assert proc.returncode == 0, proc.stderr
            cache[key] = out
        return cache[key]

    return get


def _labels(store: Path) -> np.ndarray:
    return zarr.open_array(store / "labels/segmentation/0", mode="r")[...]


@pytest.mark.parametrize("tile", ["256", "1024"])
def test_tiled_equals_whole_image(stores, tile):
    """Exact halo: a tiled run and a single-tile run agree on ≥ 99.999 % of pixels."""
    whole = _labels(stores("1504"))  # ≥ the image side (1500): one tile
    rec = json.loads((stores("1504") / "segloop" / "segloop.json").read_text())
    assert rec["grid"]["tile"] == 1504
    tiled = _labels(stores(tile))
    assert tiled.shape == whole.shape == (1500, 1300)
    agree = np.mean(tiled == whole)
    assert agree >= 0.99999, f"tile {tile}: {agree:.6%} of pixels agree"
    conf_t = zarr.open_array(stores(tile) / "confidence/0", mode="r")[...]
    conf_w = zarr.open_array(stores("1504") / "confidence/0", mode="r")[...]
    assert np.mean(np.abs(conf_t.astype(int) - conf_w) <= 1) >= 0.99999


def test_shipped_model_quality_on_unseen_seed(stores, slide):
    """The committed model on a slide rendered from a seed training never drew."""
    scores = iou(_labels(stores("512")), tifffile.imread(slide[1]))
    assert scores["nucleus"] >= 0.80, scores
    assert scores["tissue"] >= 0.90, scores


def test_store_is_valid_ome_zarr_05(stores, slide_rgb):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    store = stores("256", "--copy-image")
    root = zarr.open_group(store, mode="r")
    image = Image.from_zarr(root)
    # RGB as one colour image in napari: red, green, blue channels, full uint8 window
    omero = root.attrs["ome"]["omero"]
    assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert root.attrs["segloop"]["layers"] == {
        "labels": "labels/segmentation",
        "confidence": "confidence",
        "image": "",
    }
    assert [d.path for d in image.ome_attributes.multiscales[0].datasets][:2] == ["0", "1"]
    label = ImageLabel.from_zarr(root["labels/segmentation"])
    colours = label.ome_attributes.image_label.colors
    assert [c.label_value for c in colours] == [0, 1, 2]
    Image.from_zarr(root["confidence"])

    # ome-zarr-py (what napari-ome-zarr uses) finds the image and its label layer
    nodes = list(Reader(parse_url(str(store)))())
    assert nodes[0].specs and isinstance(nodes[0].specs[0], Multiscales)
    level0 = np.asarray(nodes[0].data[0])
    np.testing.assert_array_equal(level0, np.moveaxis(slide_rgb, -1, 0))
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert label_nodes, "ome-zarr-py did not find labels/segmentation"
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), _labels(store))


def test_source_mode_store_references_the_image(stores, slide, tmp_path):
    """A tiled pyramidal input is read in place: the store holds labels and confidence
    (each a valid OME-Zarr multiscale, found by ome-zarr-py) and where the image is."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    store = stores("256")
    record = json.loads((store / "segloop" / "segloop.json").read_text())
    assert record["image"]["mode"] == "source"
    assert Path(record["image"]["path"]) == slide[0].resolve()
    root = zarr.open_group(store, mode="r")
    assert "0" not in root and "ome" not in root.attrs
    assert root.attrs["segloop"]["layers"] == {
        "labels": "labels/segmentation",
        "confidence": "confidence",
    }
    ImageLabel.from_zarr(root["labels/segmentation"])
    Image.from_zarr(root["confidence"])
    nodes = list(Reader(parse_url(str(store / "labels/segmentation")))())
    assert any(isinstance(s, Label) for s in nodes[0].specs)
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), _labels(store))
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert size < 0.2 * slide[0].stat().st_size

    # a PNG cannot be read by region fast: its store copies the image
    png = tmp_path / "small.png"
    from PIL import Image as PILImage

    PILImage.fromarray(tifffile.imread(slide[0])[:300, :400]).save(png)
    out = tmp_path / "png.zarr"
    assert run_cli("segment", png, "-o", out, "--quiet").returncode == 0
    assert json.loads((out / "segloop" / "segloop.json").read_text())["image"] == {"mode": "copy"}
    assert zarr.open_group(out, mode="r")["0"].shape == (3, 300, 400)


def _mode_reference(a: np.ndarray) -> np.ndarray:
    """2×2 mode, ties to the top-left pixel, written as plainly as possible."""
    h, w = -(-a.shape[0] // 2), -(-a.shape[1] // 2)
    p = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
    out = np.empty((h, w), a.dtype)
    for i in range(h):
        for j in range(w):
            block = [
                p[2 * i, 2 * j],
                p[2 * i, 2 * j + 1],
                p[2 * i + 1, 2 * j],
                p[2 * i + 1, 2 * j + 1],
            ]
            counts = [block.count(v) for v in block]
            out[i, j] = block[counts.index(max(counts))]
    return out


def test_pyramids(stores, slide_rgb):
    """Labels: 2×2 mode (never an average); image and confidence: 2×2 mean."""
    arrays = read_store(stores("256", "--copy-image"))
    lab0, lab1 = arrays["labels/segmentation/0"], arrays["labels/segmentation/1"]
    np.testing.assert_array_equal(lab1, _mode_reference(lab0))
    assert set(np.unique(arrays["labels/segmentation/2"])) <= {0, 1, 2}
    img0, img1 = arrays["0"].astype(np.float64), arrays["1"].astype(np.float64)
    mean = (img0[:, ::2, ::2] + img0[:, 1::2, ::2] + img0[:, ::2, 1::2] + img0[:, 1::2, 1::2]) / 4
    assert np.abs(img1[:, : mean.shape[1], : mean.shape[2]] - mean).max() <= 0.5
    for k in range(1, 3):
        assert (
            arrays[f"{k}"].shape[1:]
            == arrays[f"labels/segmentation/{k}"].shape
            == arrays[f"confidence/{k}"].shape
        )
    np.testing.assert_array_equal(arrays["0"], np.moveaxis(slide_rgb, -1, 0))


def test_runtimes_agree(stores):
    """ONNX Runtime and PyTorch (same weights from the same file) give the same masks."""
    a, b = _labels(stores("512")), _labels(stores("512", "--runtime", "torch"))
    assert np.mean(a == b) >= 0.9999


def test_json_progress_and_stats(slide, tmp_path):
    out = tmp_path / "o.zarr"
    proc = run_cli("segment", slide[0], "-o", out, "--tile", "512", "--window", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done_px"] == progress[-1]["total_px"] == 1500 * 1300
    assert all(a["done_px"] <= b["done_px"] for a, b in itertools.pairwise(progress))
    done = events[-1]
    assert done["event"] == "done" and done["status"] == "complete"
    stages = done["stats"]["stages"]
    assert list(stages) == ["read", "pre", "infer", "post", "write"]
    assert stages["infer"]["busy_s"] > 0 and stages["infer"]["items"] >= 2  # 3×3 windows
    assert done["stats"]["window"] == 512
    record = json.loads((out / "segloop" / "segloop.json").read_text())
    assert record["status"] == "complete" and record["stats"]["stages"] == stages

    proc = run_cli("segment", slide[0], "-o", out, "--tile", "512", "--overwrite", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.returncode == 0
    for name in ("read", "pre", "infer", "post", "write", "wait in"):
        assert name in proc.stderr


def test_already_complete_and_changed_parameters(stores, slide):
    store = stores("256")
    before = (store / "segloop" / "segloop.json").read_text()
    proc = run_cli("segment", slide[0], "-o", store, "--tile", "256")
    assert proc.returncode == 0 and "already complete" in proc.stderr
    assert (store / "segloop" / "segloop.json").read_text() == before
    proc = run_cli("segment", slide[0], "-o", store, "--tile", "512")
    assert_user_error(proc, "other parameters", "tile", "--overwrite")
    assert (store / "segloop" / "segloop.json").read_text() == before


@pytest.mark.parametrize("writers", ["--no-writer-processes", "--writer-processes"])
def test_sigkill_then_resume_is_bit_identical(slide, tmp_path, writers):
    """Kill -9 after the first finished shard; the same command resumes; same bits
    (writer threads, or writer processes that die with the job)."""
    args = [slide[0], "--tile", "256", "--shard", "256", "--batch", "2", writers]
    ref = tmp_path / "ref.zarr"
    assert run_cli("segment", args[0], "-o", ref, *args[1:], "--quiet").returncode == 0

    out = tmp_path / "killed.zarr"
    child = subprocess.Popen(
        [sys.executable, "-m", "segloop", "segment", args[0], "-o", out, *args[1:], "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    manifest = out / "segloop" / "segloop.manifest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    helpers = psutil.Process(child.pid).children(recursive=True)  # writer processes
    assert bool(helpers) == (writers == "--writer-processes")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    _, left = psutil.wait_procs(helpers, timeout=120)
    assert not left, f"processes outlived the killed job: {left}"
    done_before = manifest.read_text().count("\n")
    assert 2 <= done_before < 30, "the kill should land mid-run (30 shards in all)"
    assert json.loads((out / "segloop" / "segloop.json").read_text())["status"] == "running"
    assert "ome" not in zarr.open_group(out, mode="r").attrs  # does not look like an image

    proc = run_cli("segment", args[0], "-o", out, *args[1:], "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["stats"]["resumed"] is True
    assert summary["stats"]["pixels"] < 1500 * 1300
    a, b = read_store(ref), read_store(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_overwrite_replaces_a_store(stores, slide, tmp_path):
    out = tmp_path / "o.zarr"
    assert run_cli("segment", slide[0], "-o", out, "--tile", "1024", "--quiet").returncode == 0
    proc = run_cli("segment", slide[0], "-o", out, "--tile", "512", "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "segloop" / "segloop.json").read_text())["grid"]["tile"] == 512


def test_store_root_holds_only_zarr_nodes(base_store, slide, tmp_path):
    """segloop's own files live in ``segloop/`` (an empty zarr array, so zarr never lists
    inside it): listing the whole hierarchy warns about nothing. A store made before
    keeps them at its root and is still read, checked and left complete."""
    import warnings

    from segloop.io.ome_zarr import RECORD, own_key, read_record
    from segloop.review.check import check_store

    store = tmp_path / "new.zarr"
    shutil.copytree(base_store, store)
    assert run_cli("users", "add", "a", "--role", "admin", "--store", store).returncode == 0
    root_files = sorted(p.name for p in store.iterdir() if p.is_file())
    assert root_files == ["zarr.json"], root_files
    own = {p.name for p in (store / "segloop").iterdir()}
    assert {"zarr.json", "segloop.json", "segloop.manifest", "review.sqlite"} <= own, own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr's "not recognized as a component" included
        members = dict(zarr.open_group(store, mode="r").members(max_depth=None))
    assert members["segloop"].shape == (0,)

    old = tmp_path / "old.zarr"  # the layout of stores made before segloop/
    shutil.copytree(store, old)
    for f in (old / "segloop").iterdir():
        if f.name != "zarr.json":
            f.rename(old / f.name)
    shutil.rmtree(old / "segloop")
    assert own_key(old, RECORD) == RECORD and own_key(store, RECORD) == f"segloop/{RECORD}"
    assert read_record(old) == read_record(store)
    assert check_store(old).problems == []
    proc = run_cli("segment", slide[0], "-o", old, "--tile", "256")
    assert proc.returncode == 0 and "already complete" in proc.stderr, proc.stderr
    assert not (old / "segloop").exists()  # an older store is left as it is
