"""``benchmarks/gpu/run_all.sh --rehearse``: every phase of the GPU benchmark runs here on
the CPU (CPU torch, numba's CUDA simulator, tiny images) and writes the same files, so
the script that runs once on a lent GPU cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

KEYS = {
    "device",
    "end_to_end_mpx_s",
    "model_only_mpx_s",
    "efficiency",
    "gpu_busy",
    "kernel_pre_fraction_of_copy",
    "kernel_post_fraction_of_copy",
    "vs_monai",
}
PHASES = ("env", "ceilings", "kernels", "model", "e2e", "monai")


@pytest.mark.slow
def test_run_all_rehearsal_writes_every_phase_and_the_summary(tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "--rehearse"],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        cwd=tmp_path,  # the script finds the repository by itself
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    want = sorted(
        [*(f"{p}.json" for p in PHASES), "gpu_cpu_rehearsal.json", "gpu_cpu_rehearsal.md"]
    )
    assert files == want  # ≤ 8 files: what the device tool brings back
    summary = json.loads((out / "gpu_cpu_rehearsal.json").read_text())
    assert set(summary) >= KEYS and summary["missing"] == []
    assert summary["device"] == "cpu-rehearsal" and summary["rehearsal"] is True
    for key in KEYS - {"device", "gpu_busy"}:  # no GPU: busy is null, the rest measured
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key])
    for p in PHASES:
        record = json.loads((out / f"{p}.json").read_text())
        assert record["rehearsal"] is True and record["phase"] == p
    assert json.loads((out / "kernels.json").read_text())["kernel_device"] == "simulator"
    assert "CPU REHEARSAL" in (out / "gpu_cpu_rehearsal.md").read_text()
    assert not list((ROOT / "benchmarks/results").glob("gpu_cpu*")), "rehearsal leaked"
