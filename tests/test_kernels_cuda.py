"""CUDA kernels (``kernels/pre_cuda.py``, ``kernels/post_cuda.py``) against their CPU
twins: under numba's CUDA simulator always (``NUMBA_ENABLE_CUDASIM=1``, set before
numba.cuda is imported by a fresh interpreter), on a real GPU when there is one. The
cases live in ``tests/cuda_parity_cases.py``: non-square and edge windows, uint8/uint16,
gray/RGB/RGBA, fp16/fp32 in and out, ties, clipped cores and tiles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = [
    "pre_uint8_rgb_fp32_nonsquare_edges",
    "pre_uint16_rgb_fp32",
    "pre_uint8_gray_fp16",
    "pre_uint16_rgba_fp16",
    "pre_refuses_mismatched_shapes",
    "post_fp32_k3_nonsquare_edges",
    "post_fp16_k3_ties",
    "post_fp32_k5",
    "post_fp16_k2",
    "uncertainty_matches_cpu_with_clipped_edge_tiles",
]


def _env(simulated: bool) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin"}
    if simulated:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


def _has_gpu() -> bool:
    probe = "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], env=_env(False)).returncode == 0


@pytest.fixture(scope="module", params=["cudasim", "gpu"])
def results(request) -> dict[str, str]:
    simulated = request.param == "cudasim"
    if not simulated and not _has_gpu():
        pytest.skip("no CUDA GPU here: the kernels are checked under the simulator")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cuda_parity_cases.py")],
        env=_env(simulated),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_matches_cpu_twin(results, case):
    assert results.get(case, "not run").startswith("ok"), results.get(case)


def test_every_case_is_listed(results):
    assert sorted(results) == sorted(CASES)


def test_gpu_kernel_benchmark_script_runs_under_the_simulator(tmp_path):
    """benchmarks/gpu/kernels.py (for the lent GPU) stays runnable: tiny shapes, simulator;
    its rates are null there (the simulator's timer reads 0)."""
    script = ROOT / "benchmarks" / "gpu" / "kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--out", str(tmp_path)],
        env=_env(True),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["kernel_device"] == "simulator" and result["rehearsal"] is False
    assert {"copy_gb_s", "pre_gb_s", "post_gb_s", "pre_vs_copy", "post_vs_copy"} <= set(result)
