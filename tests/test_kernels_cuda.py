"""CUDA kernels against their CPU twins: on a GPU when there is one, else under numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set here before numba.cuda is imported by a
fresh interpreter), on small inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

PARITY = textwrap.dedent("""
    import numpy as np
    from numba import cuda
    from segloop.kernels import post, post_cuda, pre, pre_cuda

    rng = np.random.default_rng(0)
    for dtype, ch, out_dtype in [(np.uint8, 3, np.float32), (np.uint16, 3, np.float32),
                                 (np.uint8, 1, np.float32), (np.uint8, 4, np.float16)]:
        top = np.iinfo(dtype).max
        src = rng.integers(0, top, (21, 19, ch), dtype=dtype, endpoint=True)
        norm = pre.Normalisation((0.5, 0.4, 0.3), (0.25, 0.2, 0.3),
                                 (0, 0, 0) if ch == 1 else (0, 1, 2), float(top))
        rows, cols = pre.reflect_index(-6, 32, 21), pre.reflect_index(-6, 32, 19)
        want = np.empty((3, 32, 32), np.float32)
        pre.normalise_into(src, rows, cols, norm, want)
        batch = pre_cuda.normalise_batch([cuda.to_device(src)] * 2,
                                         [(cuda.to_device(rows), cuda.to_device(cols))] * 2,
                                         norm, out_dtype)
        got = batch.copy_to_host()
        tol = 2e-5 if out_dtype == np.float32 else 1e-2
        assert got.dtype == out_dtype and got.shape == (2, 3, 32, 32)
        np.testing.assert_allclose(got[1].astype(np.float32), want, atol=tol, rtol=tol)

    logits = (rng.standard_normal((2, 3, 24, 24)) * 3).astype(np.float32)
    logits[0, :, 8, 8] = 0.0
    want_l, want_c = post.labels_confidence(logits, 4, 16)
    got_l, got_c = post_cuda.labels_confidence(cuda.to_device(logits), 4, 16)
    np.testing.assert_array_equal(got_l.copy_to_host(), want_l)
    assert np.abs(got_c.copy_to_host().astype(int) - want_c).max() <= 1
    print("parity ok", flush=True)
""")


@pytest.mark.parametrize("simulated", [True, False], ids=["cudasim", "gpu"])
def test_cuda_kernels_match_cpu_twins(simulated):
    env = {"PATH": "/usr/bin:/bin", "NUMBA_CACHE_DIR": str(ROOT / ".numba_cache")}
    if simulated:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)",
            ],
            env=env,
            capture_output=True,
        )
        if probe.returncode:
            pytest.skip("no CUDA GPU here: the kernels are checked under the simulator")
    proc = subprocess.run(
        [sys.executable, "-c", PARITY], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity ok" in proc.stdout


def test_gpu_kernel_benchmark_script_runs_under_the_simulator(tmp_path):
    """benchmarks/gpu/kernels.py (for the lent GPU) stays runnable: tiny shapes, simulator;
    its rates are null there (the simulator's timer reads 0)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "NUMBA_CACHE_DIR": str(ROOT / ".numba_cache"),
        "NUMBA_ENABLE_CUDASIM": "1",
    }
    script = ROOT / "benchmarks" / "gpu" / "kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["device"] == "simulator" and result["window"] == 32 and result["core"] == 16
    assert {"copy_gb_s", "pre_gb_s", "post_gb_s", "pre_vs_copy", "post_vs_copy"} <= set(result)
