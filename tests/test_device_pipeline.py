"""The device pipeline (upload → pre/model/post on the device → download), rehearsed in
numba's CUDA simulator with torch on the CPU: the same kernels, streams, events and ring
as on a GPU, compared with the CPU chain on the same model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
import zarr

from tests.conftest import assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiny(slide, tmp_path_factory):
    """16×24 crop of the test slide, tiled 16²: six 8² shards (twice the ring)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.tif"
    tifffile.imwrite(path, tifffile.imread(slide[0])[600:616, 600:624], tile=(16, 16))
    return path


def test_device_pipeline_in_the_simulator_equals_the_cpu_chain(tiny, tmp_path):
    args = ["--runtime", "torch", "--tile", "8", "--shard", "8", "--json"]
    sim, cpu = tmp_path / "sim.zarr", tmp_path / "cpu.zarr"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = run_cli("segment", tiny, "-o", sim, *args, "--device", "sim", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.splitlines()[-1])["stats"]
    assert list(stats["stages"]) == ["read", "upload", "device", "download", "write"]
    assert stats["stages"]["device"]["items"] == 6
    assert stats["gpu_busy"] is None  # the simulator's timings are not real
    assert run_cli("segment", tiny, "-o", cpu, *args).returncode == 0
    for key in ("labels/segmentation/0", "labels/segmentation/1", "confidence/0"):
        a = zarr.open_array(sim / key, mode="r")[...]
        b = zarr.open_array(cpu / key, mode="r")[...]
        if key.startswith("labels"):
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:  # float32 softmax on the device vs the CPU twin's: within one step
            assert np.abs(a.astype(int) - b).max() <= 1
    ua = zarr.open_array(sim / "tiles/uncertainty", mode="r")[...]
    ub = zarr.open_array(cpu / "tiles/uncertainty", mode="r")[...]
    np.testing.assert_allclose(ua, ub, atol=1 / 255)


def test_device_sim_without_the_simulator_is_refused(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = run_cli(
        "segment", tiny, "-o", tmp_path / "o.zarr", "--runtime", "torch", "--device", "sim",
        env=env,
    )  # fmt: skip
    assert_user_error(proc, "NUMBA_ENABLE_CUDASIM=1")
    assert not (tmp_path / "o.zarr").exists()
