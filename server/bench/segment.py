"""``segloop bench segment``: end-to-end vs model-only vs MONAI, side by side in one run.

- end-to-end: ``segment`` from the OME-TIFF on disk to a finished OME-Zarr store.
- model-only: the same runtime on batches of the same windows (halo included), already
  normalised in memory; no I/O, no pre/post.
- MONAI: ``sliding_window_inference`` (overlap 0.25, gaussian), roi = our window, same
  batch, predictor = the same ONNX Runtime session, input already in memory as a tensor;
  its output is post-processed and written to the same zarr layout. ``monai_torch``: the
  same with the torch module, as MONAI users usually run it (labelled as such).
All rates count output pixels. Rounds alternate (A, B, C, A, B, C) and the best of each
is kept; CPU time used by other processes during the run is recorded to spot noise.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from segloop.io.ome_zarr import OutputStore, remove_store
from segloop.io.source import open_image
from segloop.kernels.post import labels_confidence
from segloop.pipeline.segment import SegmentOptions, default_model, normalisation_for, segment
from segloop.pipeline.tiling import TileGrid
from segloop.runtimes import create_runtime
from segloop.synth import write_ome_tiff


class _PeakRss:
    """Samples this process's RSS every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> _PeakRss:
        self.peak = self._proc.memory_info().rss
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()


def _cpu_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _model_only(rt, src, grid: TileGrid, batch: int) -> Callable[[], float]:
    norm = normalisation_for(rt.card, src)
    from segloop.kernels.pre import normalise_into

    tiles = [t for sy, sx in grid.shards() for t in grid.tiles(sy, sx)]
    batches = []
    for i in range(0, len(tiles), batch):
        chunk = tiles[i : i + batch]
        arr = np.empty((len(chunk), 3, grid.window, grid.window), np.float32)
        for j, t in enumerate(chunk):
            r0, r1, c0, c1, rows, cols = grid.window_indices(t)
            normalise_into(src.read(r0, r1, c0, c1), rows, cols, norm, arr[j])
        batches.append(arr)

    def run() -> float:
        t0 = time.perf_counter()
        for arr in batches:
            rt.run(arr)
        return time.perf_counter() - t0

    return run


def _monai(predictor, src, grid: TileGrid, batch: int, out: Path, rss: list) -> float:
    import torch
    from monai.inferers import sliding_window_inference

    remove_store(out)  # rounds reuse the folder; deleting is not part of the timing
    rgb = src.read(0, src.height, 0, src.width)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    x = (x - 0.5) / 0.25
    t0 = time.perf_counter()
    with _PeakRss() as peak, torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=(grid.window, grid.window),
            sw_batch_size=batch,
            predictor=predictor,
            overlap=0.25,
            mode="gaussian",
        )
        labels, conf = labels_confidence(logits.numpy(), 0, src.height)
        store = OutputStore.create(out, grid, src.channels, src.dtype)
        box = (0, src.height, 0, src.width)
        store.write("segmentation", 0, box, labels[0])
        store.write("confidence", 0, box, conf[0])
    rss.append(peak.peak)
    return time.perf_counter() - t0


def peak_rss_of_segment(image: Path, out: Path, tile: int, batch: int, threads: int) -> float:
    """Peak RSS (MB) of a ``segloop segment`` child process (wait4's ru_maxrss)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segloop",
            "segment",
            str(image),
            "-o",
            str(out),
            "--tile",
            str(tile),
            "--batch",
            str(batch),
            "--threads",
            str(threads),
            "--quiet",
            "--overwrite",
        ]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"segment of {image} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024


def run_bench(
    size: int,
    tile: int = 512,
    batch: int = 4,
    threads: int = 2,
    runtime: str = "onnx",
    rounds: int = 2,
    save: Path | None = None,
    memory_sizes: list[int] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="segloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "bench.ome.tif"
        log(f"generating {size}² image …")
        write_ome_tiff(image, size, size, seed=11)
        src = open_image(image)
        model = default_model()
        rt = create_runtime(runtime, model, threads)
        grid = TileGrid.create(size, size, tile, rt.card["halo"], rt.card["input"]["multiple_of"])
        opts = SegmentOptions(
            runtime=runtime, model=model, tile=tile, batch=batch, threads=threads, overwrite=True
        )
        model_only = _model_only(rt, src, grid, batch)

        def ort_predictor(t):
            return torch.from_numpy(rt.run(t.numpy()))

        from segloop.runtimes.torch import load_unet

        module = load_unet(model, len(rt.card["classes"]))
        px = size * size
        times: dict[str, list[float]] = {"e2e": [], "model": [], "monai": []}
        rss_e2e: list[int] = []
        rss_monai: list[int] = []
        busy0, own0 = _cpu_busy_s(), sum(psutil.Process().cpu_times()[:2])
        segment(image, tmp / "warm.zarr", opts)  # JIT + page cache warm-up, not timed
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: end-to-end …")
            with _PeakRss() as peak:
                t0 = time.perf_counter()
                summary = segment(image, tmp / "e2e.zarr", opts)
                times["e2e"].append(time.perf_counter() - t0)
            rss_e2e.append(peak.peak)
            log(f"round {r + 1}/{rounds}: model-only …")
            times["model"].append(model_only())
            log(f"round {r + 1}/{rounds}: MONAI sliding window (same ORT session) …")
            times["monai"].append(
                _monai(ort_predictor, src, grid, batch, tmp / "monai.zarr", rss_monai)
            )
        log("MONAI sliding window with the torch module …")
        monai_torch_s = _monai(module, src, grid, batch, tmp / "monai_t.zarr", rss_monai)
        busy1, own1 = _cpu_busy_s(), sum(psutil.Process().cpu_times()[:2])
        best = {k: min(v) for k, v in times.items()}
        e2e, mo, mon = (px / 1e6 / best[k] for k in ("e2e", "model", "monai"))
        result: dict[str, Any] = {
            "benchmark": "segment",
            "size": size,
            "tile": grid.tile,
            "halo": grid.halo,
            "window": grid.window,
            "batch": batch,
            "threads": threads,
            "runtime": runtime,
            "rounds": rounds,
            "end_to_end_mpx_s": round(e2e, 3),
            "model_only_mpx_s": round(mo, 3),
            "efficiency": round(e2e / mo, 3),
            "monai_mpx_s": round(mon, 3),
            "vs_monai": round(e2e / mon, 3),
            "monai_torch_mpx_s": round(px / 1e6 / monai_torch_s, 3),
            "vs_monai_torch": round(e2e / (px / 1e6 / monai_torch_s), 3),
            "peak_rss_mb": round(max(rss_e2e) / 2**20, 1),
            "monai_peak_rss_mb": round(max(rss_monai) / 2**20, 1),
            "stages_last_run": summary["stats"]["stages"],
            "foreign_cpu_s": round((busy1 - busy0) - (own1 - own0), 1),
            "all_times_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        if memory_sizes:
            rss = {}
            for n in memory_sizes:
                log(f"peak RSS of segloop segment at {n}² …")
                img = tmp / f"mem_{n}.ome.tif"
                write_ome_tiff(img, n, n, seed=5)
                rss[str(n)] = round(
                    peak_rss_of_segment(img, tmp / f"mem_{n}.zarr", tile, batch, threads), 1
                )
                img.unlink()
            result["segment_peak_rss_mb_by_size"] = rss
    if save:
        _save(result, save)
    return result


def _save(result: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"segment_{result['size']}_{result['runtime']}_cpu{result['machine']['cores']}"
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("end-to-end (segloop)", result["end_to_end_mpx_s"], "1.00"),
        ("model-only ceiling", result["model_only_mpx_s"], f"{1 / result['efficiency']:.2f}"),
        (
            "MONAI sliding window, same ORT session",
            result["monai_mpx_s"],
            f"{1 / result['vs_monai']:.2f}",
        ),
        (
            "MONAI sliding window, torch module",
            result["monai_torch_mpx_s"],
            f"{1 / result['vs_monai_torch']:.2f}",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    m = result["machine"]
    (folder / f"{name}.md").write_text(
        f"# segment benchmark, {result['size']}², {result['runtime']}, {result['date']}\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB. Tile {result['tile']}"
        f" + halo {result['halo']}, batch {result['batch']}, {result['threads']} threads. "
        f"CPU used by other processes during the run: {result['foreign_cpu_s']} s.\n\n"
        f"| pipeline | Mpx/s | relative to segloop |\n|---|---|---|\n{table}\n\n"
        f"efficiency (end-to-end / model-only) = **{result['efficiency']}**, "
        f"vs_monai = **{result['vs_monai']}**, vs_monai_torch = {result['vs_monai_torch']}; "
        f"peak RSS segloop {result['peak_rss_mb']} MB vs MONAI "
        f"{result['monai_peak_rss_mb']} MB (process RSS during each phase)."
        + (
            f"\n\nsegloop peak RSS by image size (MB): {result['segment_peak_rss_mb_by_size']}"
            if "segment_peak_rss_mb_by_size" in result
            else ""
        )
        + "\n"
    )
