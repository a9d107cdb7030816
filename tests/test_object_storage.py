"""Inputs and stores on S3-compatible object storage: a real moto server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import zarr

from segloop.triton.server import free_port
from tests.conftest import read_store, run_cli

pytest.importorskip("moto", reason="moto[server] is a dev dependency (make install)")
s3fs = pytest.importorskip("s3fs", reason="s3fs is a dev dependency (make install)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto in server mode in its own process; env with its endpoint and dummy keys."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # ready when it answers; a loaded machine may hold the first answer back
        try:
            requests.get(endpoint, timeout=10)
            break
        except requests.RequestException:
            assert proc.poll() is None, "moto server exited; see moto.log"
            assert time.monotonic() < deadline, "moto server not answering after 120 s"
            time.sleep(0.2)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    fs.mkdir("segloop")
    yield {"env": env, "endpoint": endpoint, "fs": fs}
    proc.terminate()
    proc.wait(30)
    log.close()


def _remote(url: str, endpoint: str) -> dict[str, np.ndarray]:
    from zarr.storage import FsspecStore

    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    store = FsspecStore.from_url(url, storage_options=options, read_only=True)
    root = zarr.open_group(store, mode="r")
    keys = ("0", "1", "labels/segmentation/0", "labels/segmentation/1", "confidence/0")
    return {k: root[k][...] for k in keys if k in root}


def test_s3_round_trip_equals_local(s3, slide, tmp_path):
    """TIFF in a bucket → store in the bucket (endpoint via --storage-options), equal to
    the local run; the same command again finds it complete."""
    s3["fs"].put(str(slide[0]), "segloop/in/slide.ome.tif")
    local = tmp_path / "local.zarr"
    assert run_cli("segment", slide[0], "-o", local, "--tile", "256").returncode == 0
    args = (
        "segment",
        "s3://segloop/in/slide.ome.tif",
        "-o",
        "s3://segloop/out/slide.zarr",
        "--tile",
        "256",
        "--storage-options",
        json.dumps({"endpoint_url": s3["endpoint"]}),
    )
    proc = run_cli(*args, "--quiet", env=s3["env"])
    assert proc.returncode == 0, proc.stderr
    got, want = _remote("s3://segloop/out/slide.zarr", s3["endpoint"]), read_store(local)
    assert "labels/segmentation/1" in got
    assert got.keys() == {k for k in want if k in got}
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    record = json.loads(s3["fs"].cat("segloop/out/slide.zarr/segloop/segloop.json"))
    assert record["status"] == "complete"
    assert record["params"]["source"]["path"] == "s3://segloop/in/slide.ome.tif"
    # the image is read in place from the bucket, as from a local file
    assert record["image"]["mode"] == "source"
    assert record["image"]["path"] == "s3://segloop/in/slide.ome.tif"
    assert s3["fs"].ls("segloop/out/slide.zarr/segloop/segloop.manifest.d")  # resume markers
    proc = run_cli(*args, env=s3["env"])
    assert proc.returncode == 0 and "already complete" in proc.stderr


def test_s3_zarr_input_on_the_cluster(s3, slide, tmp_path):
    """An OME-Zarr input in the bucket, segmented by a LocalCluster into the bucket
    (endpoint from AWS_ENDPOINT_URL this time)."""
    local = tmp_path / "local.zarr"  # with its own image copy: an OME-Zarr image input
    proc = run_cli("segment", slide[0], "-o", local, "--tile", "256", "--copy-image")
    assert proc.returncode == 0, proc.stderr
    s3["fs"].put(str(local), "segloop/zarr-in/slide.zarr", recursive=True)
    env = {**s3["env"], "AWS_ENDPOINT_URL": s3["endpoint"]}
    out = "s3://segloop/out/from-zarr.zarr"
    proc = run_cli(
        "segment", "s3://segloop/zarr-in/slide.zarr", "-o", out, "--tile", "256",
        "--dask", "local:2", "--quiet", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got, want = _remote(out, s3["endpoint"]), read_store(local)
    np.testing.assert_array_equal(got["labels/segmentation/0"], want["labels/segmentation/0"])
