"""Phases 4 + 5: end to end through the real CLI, GPU busy fraction, stage breakdown
(→ ``e2e.json``).

``segloop segment`` (``python -m segloop``) with ``--runtime torch --device cuda
--stats --json``: one warm-up run on a ``--warm-size``² image (JIT caches, cuDNN
autotuning, page cache), then one timed run on a ``--size``² image, both made by
``make_image.py``. The rate is the CLI's own (``stats.mpx_s``: output Mpx over its wall
time, OME-TIFF on disk → finished OME-Zarr with pyramids).

GPU busy: the pipeline's own figure when its ``--stats`` report one (``stats.gpu_busy``,
from CUDA events), else the mean of ``nvidia-smi`` utilisation sampled every 100 ms during
the timed run (the fraction of time some kernel ran), with its source recorded. In a
rehearsal (``--device cpu``) it is null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_image
from common import write_phase


class UtilSampler(threading.Thread):
    """``nvidia-smi`` GPU utilisation (%) every ``period`` s until ``stop()``."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.cmd, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.period)

    def stop(self) -> float | None:
        self._stop.set()
        self.join(10)
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def segment(image: Path, store: Path, device: str, tile: int, batch: int, *extra: str) -> dict:
    """Run the CLI; return its final JSON line (``{"event": "done", "stats": …}``)."""
    cmd = [sys.executable, "-m", "segloop", "segment", str(image), "-o", str(store)]
    cmd += ["--runtime", "torch", "--device", device, "--tile", str(tile), "--batch", str(batch)]
    cmd += ["--overwrite", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=20480)
    ap.add_argument("--warm-size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segloop-e2e-", dir=args.work))
    try:
        t0 = time.perf_counter()
        warm, big = work / "warm.tif", work / "big.tif"
        make_image.write(warm, args.warm_size)
        make_image.write(big, args.size)
        image_s = time.perf_counter() - t0
        warm_summary = segment(warm, work / "warm.zarr", args.device, args.tile, args.batch)
        sampler = UtilSampler() if args.device == "cuda" and shutil.which("nvidia-smi") else None
        if sampler:
            sampler.start()
        summary = segment(big, work / "big.zarr", args.device, args.tile, args.batch, "--stats")
        sampled = sampler.stop() if sampler else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = summary["stats"]
    wall = stats["wall_s"]
    reported = stats.get("gpu_busy")
    stages = stats.get("stages", {})
    write_phase(
        args.out,
        "e2e",
        {
            "size": args.size,
            "warm_size": args.warm_size,
            "tile": args.tile,
            "batch": args.batch,
            "runtime": "torch",
            "cli_device": args.device,
            "end_to_end_mpx_s": stats.get("mpx_s") or round(stats["pixels"] / wall / 1e6, 3),
            "wall_s": wall,
            "warm_wall_s": warm_summary["stats"]["wall_s"],
            "image_write_s": round(image_s, 2),
            "gpu_busy": reported if reported is not None else sampled,
            "gpu_busy_source": (
                "pipeline (--stats)"
                if reported is not None
                else "nvidia-smi utilization.gpu, 100 ms samples"
                if sampled is not None
                else None
            ),
            "gpu_busy_nvidia_smi": sampled,
            "stage_busy_fraction": {
                k: round(v["busy_s"] / wall, 3) for k, v in stages.items() if "busy_s" in v
            },
            "stats": stats,
            "threads": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
