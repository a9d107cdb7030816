"""`segment --dask`: a real LocalCluster of worker processes; `segment-batch`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from segloop.synth import write_ome_tiff
from tests.conftest import read_store, run_cli

GRID = ("--tile", "256", "--shard", "512")


def _same_store(a: Path, b: Path) -> None:
    got, want = read_store(a), read_store(b)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A 2048² slide (4 bands of 512 px shards) and its single-process store."""
    d = tmp_path_factory.mktemp("cluster")
    img = d / "big.ome.tif"
    write_ome_tiff(img, 2048, 2048, seed=5, compression="zlib")
    ref = d / "single.zarr"
    proc = run_cli("segment", img, "-o", ref, *GRID, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return img, ref


def test_local_cluster_output_equals_single_process(big, tmp_path):
    out = tmp_path / "dask.zarr"
    proc = run_cli("segment", big[0], "-o", out, *GRID, "--dask", "local:2", "--json")
    assert proc.returncode == 0, proc.stderr
    _same_store(out, big[1])
    stats = json.loads(proc.stdout.splitlines()[-1])["stats"]
    assert stats["cluster"]["tasks"] == 4
    progress = [json.loads(ln) for ln in proc.stdout.splitlines()[:-1]]
    assert progress and progress[-1]["done_px"] == progress[-1]["total_px"] == 2048 * 2048


def test_worker_killed_mid_job_output_is_identical(big, tmp_path):
    """SIGKILL one worker process once the first band is in the manifest: Dask re-runs
    its task elsewhere and the store equals the single-process one."""
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "segloop", "segment", str(big[0]), "-o", str(out), *GRID]
    proc = subprocess.Popen([*cmd, "--dask", "local:2", "--quiet"], stderr=subprocess.PIPE)
    manifest = out / "segloop" / "segloop.manifest"
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and killed is None:
        assert time.monotonic() < deadline
        if manifest.exists() and manifest.read_text().strip():
            workers = [  # the worker processes (their nannies live in the client)
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())
            ]
            if workers:
                killed = workers[0].pid
                workers[0].send_signal(signal.SIGKILL)
        time.sleep(0.02)
    assert killed is not None, "the job ended before a worker could be killed"
    assert proc.wait(300) == 0, proc.stderr.read()
    bands = sum(1 for ln in manifest.read_text().splitlines() if ln.startswith("0 "))
    assert bands == 16  # every level-0 shard listed once
    _same_store(out, big[1])


def test_bad_scheduler_is_one_line(big, tmp_path):
    from tests.conftest import assert_user_error

    proc = run_cli("segment", big[0], "-o", tmp_path / "x.zarr", "--dask", "local:0")
    assert_user_error(proc, "local:N")
    proc = run_cli("segment", big[0], "-o", tmp_path / "y.zarr", "--dask", "tcp://127.0.0.1:9")
    assert_user_error(proc, "scheduler")
    assert not (tmp_path / "y.zarr" / "zarr.json").exists()


def test_segment_batch_with_one_corrupt_image(slide, tmp_path):
    """Three images on the cluster, one corrupt: two stores, one clear error in the
    summary, exit code 1; run again: the finished ones are skipped."""
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.full((300, 260, 3), 200, np.uint8)).save(small)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x07" * 2000)
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# three slides\n{slide[0]}\n{corrupt}\n\n{small}\n")
    out = tmp_path / "out"
    args = ("segment-batch", listing, "-o", out, "--tile", "256", "--quiet")
    proc = run_cli(*args, "--dask", "local:2", "--concurrency", "2")
    assert proc.returncode == 1, proc.stderr
    lines = (out / "segloop-batch.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), ln.split("\t"), strict=True)) for ln in lines[1:]]
    assert [r["status"] for r in rows] == ["complete", "error", "complete"]
    assert "corrupt.tif" in rows[1]["error"] and "Traceback" not in rows[1]["error"]
    assert float(rows[0]["mpx"]) == round(1500 * 1300 / 1e6, 1) and float(rows[0]["mpx_s"]) > 0
    assert (out / "slide.zarr" / "zarr.json").exists() and (out / "small.zarr").exists()
    assert not (out / "corrupt.zarr" / "zarr.json").exists()
    proc = run_cli(*args)
    lines = (out / "segloop-batch.tsv").read_text().splitlines()
    again = [ln.split("\t")[4] for ln in lines[1:]]
    assert again == ["already-complete", "error", "already-complete"]
