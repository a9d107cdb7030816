"""`segloop synth`, `segloop demo` and `segloop bench segment` through the real CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import requests
import tifffile

from segloop.bench.process import ServerProcess
from segloop.synth import render
from tests.conftest import run_cli


def test_synth_writes_tiled_pyramidal_ome_tiff_with_truth(tmp_path):
    img, truth = tmp_path / "s.ome.tif", tmp_path / "t.tif"
    proc = run_cli(
        "synth",
        img,
        "--size",
        "1100x1300",
        "--seed",
        "5",
        "--truth",
        truth,
        "--compression",
        "zlib",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    with tifffile.TiffFile(img) as t:
        assert t.is_ome
        page = t.series[0].levels[0].pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert [lv.shape for lv in t.series[0].levels] == [(1100, 1300, 3), (550, 650, 3)]
        rgb = t.series[0].asarray()
    classes = tifffile.imread(truth)
    assert classes.shape == (1100, 1300)
    assert set(np.unique(classes)) == {0, 1, 2}
    # tile-by-tile rendering equals rendering the region at once
    region, region_truth = render(300, 700, 200, 300, seed=5)
    np.testing.assert_array_equal(rgb[300:500, 700:1000], region)
    np.testing.assert_array_equal(classes[300:500, 700:1000], region_truth)
    # H&E-like: nuclei darker and bluer than tissue
    nuc, tis = rgb[classes == 2].mean(0), rgb[classes == 1].mean(0)
    assert nuc.sum() < tis.sum() and nuc[2] > nuc[0] - 10


def test_synth_seed_and_stain_change_the_image():
    a, ta = render(0, 0, 512, 512, seed=1)
    _b, tb = render(0, 0, 512, 512, seed=2)
    c, tc = render(0, 0, 512, 512, seed=1, stain="shifted")
    assert not np.array_equal(ta, tb)
    np.testing.assert_array_equal(ta, tc)  # same tissue, other colours
    tissue = ta > 0
    assert tissue.mean() > 0.05
    assert np.abs(a.astype(int) - c)[tissue].mean() > 10


def test_demo_small(tmp_path):
    """``demo --no-serve`` segments and scores; plain ``demo`` (what ``make demo`` runs)
    then ends in the review server with one login URL."""
    proc = run_cli("demo", "--size", "1024", "--dir", tmp_path / "demo", "--no-serve")
    assert proc.returncode == 0, proc.stderr
    store = tmp_path / "demo" / "slide_1024x1024.zarr"
    assert f"The OME-Zarr store is {store}" in proc.stderr
    assert json.loads((store / "segloop" / "segloop.json").read_text())["status"] == "complete"
    assert "IoU vs ground truth" in proc.stderr
    cmd = [sys.executable, "-m", "segloop", "demo", "--size", "1024", "--dir", tmp_path / "demo"]
    with ServerProcess([*cmd, "--port", "{port}"]) as server:
        logins = [ln for ln in server.stderr_text().splitlines() if "?token=" in ln]
        assert len(logins) == 1 and f"{server.base}/?token=" in logins[0], logins
        assert "already complete" in server.stderr_text()
        assert requests.get(server.base + "/", timeout=30).status_code == 200


def test_bench_segment_reports_side_by_side(tmp_path):
    proc = run_cli("bench", "segment", "--size", "512", "--json", "--save", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for key in (
        "end_to_end_mpx_s",
        "model_only_mpx_s",
        "efficiency",
        "monai_mpx_s",
        "vs_monai",
        "peak_rss_mb",
    ):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert abs(r["efficiency"] - r["end_to_end_mpx_s"] / r["model_only_mpx_s"]) < 0.01
    assert abs(r["efficiency_vs_cold"] - r["end_to_end_mpx_s"] / r["model_only_cold_mpx_s"]) < 0.01
    assert set(r["warmup_times_s"]) == set(r["all_times_s"])
    assert (
        abs(
            r["efficiency_same_runtime"]
            - r["end_to_end_warm_runtime_mpx_s"] / r["model_only_mpx_s"]
        )
        < 0.01
    )
    assert abs(r["vs_monai"] - r["end_to_end_mpx_s"] / r["monai_mpx_s"]) < 0.01
    assert r["machine"]["cores"] >= 1
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))
