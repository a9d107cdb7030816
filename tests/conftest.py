"""Shared fixtures: small synthetic images on disk and a real `segloop` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from segloop.synth import write_ome_tiff

ROOT = Path(__file__).resolve().parents[1]

#: seed of the test slide: training draws world seeds in 1..9999, so this one is unseen
SLIDE_SEED = 20261


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "segloop", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, exactly one line on stderr that names the problem, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("segloop: error:"), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def read_store(path: Path) -> dict[str, np.ndarray]:
    """Every array of a segloop store, by path."""
    root = zarr.open_group(path, mode="r")
    out = {}
    for prefix in ("", "labels/segmentation/", "confidence/"):
        k = 0
        while f"{prefix}{k}" in root:
            out[f"{prefix}{k}"] = root[f"{prefix}{k}"][...]
            k += 1
    return out


@pytest.fixture(scope="session", autouse=True)
def segloop_cache(tmp_path_factory) -> Path:
    """``$SEGLOOP_CACHE`` (review servers' tile packs) in a temporary folder, for this
    process and the servers it starts, never the user's ``~/.cache``."""
    d = tmp_path_factory.mktemp("segloop-cache")
    os.environ["SEGLOOP_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def slide(tmp_path_factory) -> tuple[Path, Path]:
    """1500×1300 H&E-like OME-TIFF (zlib, lossless) and its ground truth."""
    d = tmp_path_factory.mktemp("slide")
    img, truth = d / "slide.ome.tif", d / "truth.tif"
    write_ome_tiff(img, 1500, 1300, seed=SLIDE_SEED, truth_path=truth, compression="zlib")
    return img, truth


@pytest.fixture(scope="session")
def slide_rgb(slide) -> np.ndarray:
    return tifffile.imread(slide[0])


#: tile of the reviewed test store (small, so the 1500×1300 slide has 6×6 tiles)
TILE = 256


@pytest.fixture(scope="session")
def base_store(slide, tmp_path_factory) -> Path:
    """The test slide segmented with tile 256; tests copy it before changing it. The slide
    is a tiled pyramidal TIFF, so by default the store reads its image in place from it
    (``"image": {"mode": "source"}``; its zlib tiles of 512² are decoded and re-encoded)."""
    out = tmp_path_factory.mktemp("review") / "slide.zarr"
    proc = run_cli("segment", slide[0], "-o", out, "--tile", str(TILE), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out
