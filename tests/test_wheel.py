"""The wheel, installed into a clean venv outside the checkout, runs the demo in an empty
folder and serves its store with the UI: model repository, UI and OpenSeadragon travel
as package data (``segloop.assets``), nothing is found through the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests

from segloop.assets import OSD_DIR
from segloop.bench.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from this checkout, installed (no deps) into a new venv whose only
    other packages are the project venv's, reached by a plain path (not its .pth files,
    so the editable install of segloop is not seen)."""
    if not OSD_DIR.is_dir():
        pytest.skip("review_ui/node_modules missing: run `make install` (npm) first")
    tmp = tmp_path_factory.mktemp("wheel")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(ROOT)],
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("segloop-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    Path(site.stdout.strip(), "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)]
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEGLOOP_MODEL_REPOSITORY")
    }
    work = tmp / "empty"
    work.mkdir()
    return {"wheel": wheel, "bin": venv / "bin", "env": env, "cwd": work}


def test_wheel_carries_model_and_ui(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for name in (
        "segloop/model_repository/segloop_unet/1/model.onnx",
        "segloop/model_repository/segloop_unet/config.pbtxt",
        "segloop/model_repository/segloop_pre/1/model.py",
        "segloop/model_repository/segloop/1/.gitkeep",
        "segloop/review_ui/index.html",
        "segloop/review_ui/app.js",
        "segloop/review_ui/node_modules/openseadragon/build/openseadragon/openseadragon.min.js",
    ):
        assert name in names, name
    sources = {  # every module of the checkout's package, where the wheel must hold it
        "segloop/" + str(f.relative_to(ROOT / "server" / "segloop"))
        for f in (ROOT / "server" / "segloop").rglob("*.py")
    } | {
        "segloop/kernels/" + f.name for f in (ROOT / "kernels" / "segloop" / "kernels").glob("*.py")
    }
    assert sources - names == set(), "add these packages to pyproject.toml"
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


#: what a later process asks numba's cache for: the review server's rasterisers
RASTER_PROBE = """
import json
from segloop.review import raster
raster.warm_up()
fs = (raster.polygon, raster.stroke, raster.flood)
print(json.dumps({f.__name__: [sum(f.stats.cache_hits.values()),
                               sum(f.stats.cache_misses.values())] for f in fs}))
"""


def test_installed_warm_up_demo_then_serve(installed):
    """As after ``pip install`` (or ``make install``): ``segloop warm-up`` compiles the
    job's and the review server's kernels into numba's default cache (``__pycache__``
    beside the installed sources, NUMBA_CACHE_DIR unset); a later process loads them,
    compiling none; then the demo and ``segloop serve`` run from the installed package."""
    segloop, py = str(installed["bin"] / "segloop"), str(installed["bin"] / "python")
    env = {k: v for k, v in installed["env"].items() if k != "NUMBA_CACHE_DIR"}
    cwd = installed["cwd"]
    where = _run([py, "-c", "import segloop.assets as a; print(a.UI_DIR)"], env=env, cwd=cwd)
    package = Path(where.stdout.strip()).parent
    assert not package.is_relative_to(ROOT), where.stdout
    assert not list(package.rglob("*.nbi")), "the fresh install holds compiled kernels"
    warm = _run([segloop, "warm-up"], env=env, cwd=cwd)
    assert "__pycache__" in warm.stderr, warm.stderr
    cached = {f.name.split("-")[0] for f in package.rglob("__pycache__/*.nbi")}
    pipeline = {"pre._normalise_windows", "post._windows_into", "pyramid._mode2"}
    assert pipeline <= cached, cached  # the job's kernels, compiled and cached
    hits = json.loads(_run([py, "-c", RASTER_PROBE], env=env, cwd=cwd).stdout)
    assert all(h > 0 and m == 0 for h, m in hits.values()), hits  # loaded, none compiled
    demo = _run([segloop, "demo", "--size", "1024", "--no-serve"], env=env, cwd=cwd)
    assert "IoU vs ground truth" in demo.stderr
    store = installed["cwd"] / "demo" / "slide_1024x1024.zarr"
    assert (store / "labels" / "segmentation" / "0" / "zarr.json").is_file()
    with ServerProcess(
        [segloop, "serve", str(store), "--port", "{port}"], env=env, cwd=cwd
    ) as server:
        page = requests.get(server.base + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        osd = requests.get(server.base + "/vendor/openseadragon/openseadragon.min.js", timeout=30)
        assert osd.status_code == 200 and len(osd.content) > 10_000
        assert "Log in once with" in server.stderr_text()
