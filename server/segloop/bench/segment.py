"""``segloop bench segment``: end-to-end vs model-only vs MONAI, side by side in one run.

- end-to-end: ``segment`` from the OME-TIFF on disk to a finished OME-Zarr store, with
  its own runtime as the CLI runs it, and on model-only's warm session (``runtime=``, as
  ``segment-batch`` runs its later slides).
- model-only: the same runtime on batches of the same windows (halo included), already
  normalised in memory; no I/O, no pre/post.
- MONAI: ``sliding_window_inference`` (overlap 0.25, gaussian), roi = our window, same
  batch, predictor = the same ONNX Runtime session, input already in memory as a tensor;
  its output is post-processed and written to the same zarr layout. ``monai_torch``: the
  same with the torch module, as MONAI users usually run it (labelled as such).
- "fresh runtime" variants of model-only and MONAI: a new runtime per run, its start
  timed, as every job (segloop's end-to-end included) starts one. On a VM whose balloon
  hands freed pages back to the host, faulting memory in costs several times more when it
  was freed seconds earlier (``first_touch_s_per_gb``, recorded with the machine): a
  fresh runtime pays that for its activations, a warm session does not.
All rates count output pixels. One untimed round of every pipeline comes first (JIT, page
cache), then timed rounds alternate (A, B, C, A, B, C) and the best of each is kept; CPU
time used by other processes during the run is recorded.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from segloop.bench.monai import half_predictor, monai_segment, ort_predictor
from segloop.bench.zero_model import identity_model
from segloop.io.formats import open_image
from segloop.io.ome_zarr import remove_store
from segloop.kernels.pre import normalise_windows
from segloop.pipeline.job import job_runtime
from segloop.pipeline.read import ShardReader, batches
from segloop.pipeline.segment import (
    BATCH_PIXELS,
    SegmentOptions,
    default_model,
    normalisation_for,
    segment,
)
from segloop.pipeline.stages import StageStats
from segloop.runtimes import create_runtime, device_options
from segloop.synth import write_ome_tiff
from segloop.tiling import TileGrid

#: MONAI's sw_batch_size: four 608² windows per call, as its users run it
MONAI_BATCH = 4


def cpu_busy_s() -> float:
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


def first_touch_s_per_gb(gib: float = 1.0, idle_s: float = 3.0) -> dict[str, float]:
    """Seconds per GiB to fault in fresh anonymous memory: right after the same amount was
    freed (``hot``), and after ``idle_s`` seconds idle (``cold``). On a VM whose balloon
    reports free pages to the host (Firecracker, some clouds) ``cold`` is several times
    ``hot``: every job's first touch of its runtime's activations pays it; bare metal
    shows both alike."""

    def touch() -> float:
        t0 = time.perf_counter()
        block = np.ones(int(gib * 2**30) // 8)  # float64, every page written
        took = time.perf_counter() - t0
        del block
        return took / gib

    touch()
    hot = min(touch(), touch())
    time.sleep(idle_s)
    return {"hot": round(hot, 3), "cold": round(touch(), 3), "idle_s": idle_s}


def _model_windows(rt, src, grid: TileGrid, batch: int) -> list[np.ndarray]:
    """The pipeline's own batches (same windows, halo included), normalised in memory:
    float32 (n, 3, h, w)."""
    norm = normalisation_for(rt.card, src)
    arrays = []
    for work in ShardReader(src, grid, list(grid.shards()), 1, StageStats("read")):
        for idx in batches(work, batch):
            rows = np.stack([work.maps[i][0] for i in idx])
            cols = np.stack([work.maps[i][1] for i in idx])
            arr = np.empty((len(idx), 3, rows.shape[1], cols.shape[1]), np.float32)
            normalise_windows(work.region, rows, cols, norm, arr)
            arrays.append(arr)
    return arrays


def _model_only(arrays: list[np.ndarray], rt=None, fresh=None) -> Callable[[], float]:
    """The runtime alone on ``arrays``: ``rt`` (warm, kept), or with ``fresh`` (a function
    making a runtime) a new one per run, its start timed too, closed after."""

    def run() -> float:
        t0 = time.perf_counter()
        runtime = fresh() if fresh else rt
        for arr in arrays:
            runtime.run(arr)
        if fresh:
            runtime.close()
        return time.perf_counter() - t0

    return run


def store_bytes(path: Path) -> int:
    """Bytes of every file under a store."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def per_mpx(stages: dict[str, Any], pixels: int) -> dict[str, float]:
    """Busy seconds of each stage per output Mpx (writers summed over their threads)."""
    return {k: round(v["busy_s"] / (pixels / 1e6), 4) for k, v in stages.items()}


def child_peak_rss_mb(args: list[str]) -> float:
    """Run ``python -m ARGS…`` in a fresh process that prints JSON lines; the last one
    carries its own peak RSS (``peak_rss_mb``, top level or under ``stats``)."""
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr[-500:]}")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return last.get("peak_rss_mb") or last["stats"]["peak_rss_mb"]


def segloop_peak_rss_mb(image: Path, out: Path, tile: int, batch: int, threads: int) -> float:
    args = ["segment", str(image), "-o", str(out), "--tile", str(tile), "--batch", str(batch)]
    return child_peak_rss_mb(["segloop", *args, "--threads", str(threads), "--json", "--overwrite"])


def monai_peak_rss_mb(image: Path, out: Path, tile: int, batch: int, threads: int) -> float:
    args = [str(image), str(out), "--tile", str(tile), "--batch", str(batch)]
    return child_peak_rss_mb(["segloop.bench.monai", *args, "--threads", str(threads)])


def run_bench(
    size: int,
    tile: int = 512,
    batch: int | None = None,
    threads: int = 2,
    runtime: str = "onnx",
    device: str = "cpu",
    rss: bool = True,
    rounds: int = 2,
    save: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Throughput side by side (rounds alternate, best kept) and, with ``rss``, each
    pipeline's peak RSS measured in its own process on the same image (CPU runtimes).
    ``device="cuda"`` (``--runtime torch``): segloop, model-only and both MONAI runs use the
    same float16 module on the GPU (MONAI with ``sw_device="cuda"``)."""
    import torch

    from segloop.model.weights import load_unet

    on_gpu = device_options(runtime, device)  # refuses a bad pair before any work
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="segloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "bench.ome.tif"
        log(f"generating {size}² image …")
        write_ome_tiff(image, size, size, seed=11)
        src = open_image(image)
        model = default_model()
        rt = create_runtime(runtime, model, threads, **on_gpu)
        grid = TileGrid.create(size, size, tile, rt.card["halo"], rt.card["input"]["multiple_of"])
        batch = batch or grid.default_batch(BATCH_PIXELS)
        opts = SegmentOptions(
            runtime=runtime, model=model, tile=tile, batch=batch, threads=threads,
            overwrite=True, runtime_options=on_gpu,
        )  # fmt: skip
        windows = _model_windows(rt, src, grid, batch)
        model_only = _model_only(windows, rt)
        model_cold = _model_only(windows, fresh=lambda: job_runtime(opts))
        # host ceiling: the same job with a model that costs nothing (bench/zero_model.py),
        # always ONNX Runtime on the CPU: what the pipeline around any model can feed
        zero_opts = replace(
            opts, runtime="onnx", model=identity_model(model, tmp / "zero.onnx"),
            runtime_options={},
        )  # fmt: skip
        predictor = ort_predictor(rt)
        module = half_predictor(rt.model) if on_gpu else load_unet(model, len(rt.card["classes"]))
        px = size * size
        summaries: dict[str, dict[str, Any]] = {}

        def job(key: str, job_opts: SegmentOptions, runtime=None) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                summaries[key] = segment(image, tmp / f"{key}.zarr", job_opts, runtime=runtime)
                return time.perf_counter() - t0

            return run

        def monai_cold() -> float:
            t0 = time.perf_counter()
            fresh = job_runtime(opts)
            made = time.perf_counter() - t0
            try:
                return made + monai_segment(
                    ort_predictor(fresh), src, grid, MONAI_BATCH, tmp / "monai.zarr"
                )
            finally:
                fresh.close()

        # each returns the seconds it was timed for
        runs: dict[str, tuple[str, Callable[[], float]]] = {
            "ceiling": ("host ceiling (zero-cost model)", job("ceiling", zero_opts)),
            "e2e": ("end-to-end", job("e2e", opts)),
            # the same job on model-only's warm session (as segment-batch's later slides)
            "e2e_warm": ("end-to-end, warm runtime", job("e2e_warm", opts, rt)),
            "model": ("model-only", model_only),
            "model_cold": ("model-only, fresh runtime", model_cold),
            "monai": (
                "MONAI sliding window (same runtime session)",
                lambda: monai_segment(predictor, src, grid, MONAI_BATCH, tmp / "monai.zarr"),
            ),
            "monai_cold": ("MONAI sliding window, fresh runtime", monai_cold),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        warmup: dict[str, float] = {}
        busy0, own0 = cpu_busy_s(), sum(psutil.Process().cpu_times()[:2])
        load0 = os.getloadavg()
        for r in range(rounds + 1):  # round 0: untimed warm-up (JIT, page cache, memory)
            for key, (name, run) in runs.items():
                log(f"round {r}/{rounds}: {name} …" if r else f"warm-up: {name} …")
                took = run()
                if r:
                    times[key].append(took)
                else:
                    warmup[key] = round(took, 3)
        ceiling, summary = summaries["ceiling"], summaries["e2e"]
        log("MONAI sliding window with the torch module …")
        monai_torch_s = monai_segment(module, src, grid, MONAI_BATCH, tmp / "monai_t.zarr", device)
        source_bytes = image.stat().st_size
        store_ratio = store_bytes(tmp / "e2e.zarr") / source_bytes
        log("store size with the image copied (--copy-image, zero-cost model) …")
        segment(image, tmp / "copy.zarr", replace(zero_opts, copy_image=True))
        copy_ratio = store_bytes(tmp / "copy.zarr") / source_bytes
        busy1, own1 = cpu_busy_s(), sum(psutil.Process().cpu_times()[:2])
        load1 = os.getloadavg()
        rt.close()
        rss_mb = rss_monai = None
        if rss:
            log("peak RSS of each pipeline in its own process …")
            rss_mb = segloop_peak_rss_mb(image, tmp / "rss.zarr", tile, batch, threads)
            rss_monai = monai_peak_rss_mb(image, tmp / "rss_monai.zarr", tile, MONAI_BATCH, threads)
    best = {k: min(v) for k, v in times.items()}
    keys = ("e2e", "e2e_warm", "model", "model_cold", "monai", "monai_cold", "ceiling")
    e2e, e2e_warm, mo, cold, mon, mon_cold, ceil = (px / 1e6 / best[k] for k in keys)
    cores = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "benchmark": "segment",
        "size": size,
        "tile": grid.tile,
        "halo": grid.halo,
        "window": summary["stats"]["window"],
        "batch": batch,
        "threads": threads,
        "runtime": runtime,
        "device": device,
        "rounds": rounds,
        "end_to_end_mpx_s": round(e2e, 3),
        "model_only_mpx_s": round(mo, 3),
        "efficiency": round(e2e / mo, 3),
        "model_only_cold_mpx_s": round(cold, 3),
        # the pipeline against a runtime that also starts fresh, as every job's does
        "efficiency_vs_cold": round(e2e / cold, 3),
        "end_to_end_warm_runtime_mpx_s": round(e2e_warm, 3),
        # the pipeline alone: the same job and the ceiling on one warm session
        "efficiency_same_runtime": round(e2e_warm / mo, 3),
        "monai_mpx_s": round(mon, 3),
        "vs_monai": round(e2e / mon, 3),
        "monai_cold_mpx_s": round(mon_cold, 3),
        "vs_monai_cold": round(e2e / mon_cold, 3),
        "monai_torch_mpx_s": round(px / 1e6 / monai_torch_s, 3),
        "vs_monai_torch": round(e2e / (px / 1e6 / monai_torch_s), 3),
        "host_ceiling_mpx_s": round(ceil, 3),
        "host_ceiling_mpx_s_per_core": round(ceil / cores, 3),
        "host_ceiling_how": "the same segment job with the model replaced by an ONNX Identity "
        "graph carrying the shipped model card (segloop.bench.zero_model), ONNX Runtime, CPU",
        "stage_busy_s_per_mpx_host_ceiling": per_mpx(ceiling["stats"]["stages"], px),
        # the writers' seconds with at least one write task running (busy_s sums the tasks)
        "write_busy_any_s_per_mpx_host_ceiling": round(
            ceiling["stats"]["stages"]["write"]["busy_any_s"] / (px / 1e6), 4
        ),
        "stage_busy_s_per_mpx": per_mpx(summary["stats"]["stages"], px),
        "halo_overhead": summary["stats"]["halo_overhead"],
        "image_mode": summary["image"]["mode"],
        "store_bytes_per_source_byte": round(store_ratio, 3),
        "store_bytes_per_source_byte_copy_image": round(copy_ratio, 3),
        "peak_rss_mb": rss_mb,
        "monai_peak_rss_mb": rss_monai,
        "stages_last_run": summary["stats"]["stages"],
        "foreign_cpu_s": round((busy1 - busy0) - (own1 - own0), 1),
        "load_avg_1min_start_end": [round(load0[0], 2), round(load1[0], 2)],
        "all_times_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "warmup_times_s": warmup,
        "machine": {**machine(), "memory_first_touch_s_per_gb": first_touch_s_per_gb()},
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    if save:
        _save(result, save)
    return result


def run_memory(
    sizes: list[int],
    monai_sizes: list[int],
    tile: int = 512,
    batch: int = 4,
    threads: int = 2,
    save: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Peak RSS (MB) of segloop and of MONAI by square image size, each in a fresh process.

    MONAI's peak grows with the pixel count; a straight line through its points gives the
    largest size that fits in this machine's memory (reported as an extrapolation).
    """
    seg: dict[str, float] = {}
    mon: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="segloop-mem-") as tmpdir:
        tmp = Path(tmpdir)
        for n in sorted(set(sizes) | set(monai_sizes)):
            log(f"{n}²: generating …")
            img = tmp / f"mem_{n}.ome.tif"
            write_ome_tiff(img, n, n, seed=5)
            if n in sizes:
                log(f"{n}²: segloop segment …")
                seg[str(n)] = segloop_peak_rss_mb(img, tmp / "seg.zarr", tile, batch, threads)
                remove_store(tmp / "seg.zarr")
            if n in monai_sizes:
                log(f"{n}²: MONAI sliding window …")
                mon[str(n)] = monai_peak_rss_mb(img, tmp / "monai.zarr", tile, batch, threads)
                remove_store(tmp / "monai.zarr")
            img.unlink()
    result: dict[str, Any] = {
        "benchmark": "memory",
        "tile": tile,
        "batch": batch,
        "threads": threads,
        "segloop_peak_rss_mb": seg,
        "monai_peak_rss_mb": mon,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if len(seg) >= 2:
        lo, hi = min(seg, key=int), max(seg, key=int)
        result["segloop_rss_ratio_largest_vs_smallest"] = round(seg[hi] / seg[lo], 3)
    if len(mon) >= 2:
        (n0, m0), (n1, m1) = sorted(((int(k), v) for k, v in mon.items()))[:2]
        per_px = (m1 - m0) / (n1 * n1 - n0 * n0)  # MB per pixel
        limit = result["machine"]["memory_gb"] * 1024
        result["monai_mb_per_mpx"] = round(per_px * 1e6, 1)
        result["monai_largest_side_extrapolated"] = int(((limit - m0) / per_px + n0 * n0) ** 0.5)
    if save:
        save.mkdir(parents=True, exist_ok=True)
        name = f"memory_cpu{result['machine']['cores']}"
        (save / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _save(result: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    runtime = result["runtime"] + ("" if result["device"] == "cpu" else f"-{result['device']}")
    name = f"segment_{result['size']}_{runtime}_cpu{result['machine']['cores']}"
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("end-to-end (segloop)", result["end_to_end_mpx_s"], "1.00"),
        (
            "end-to-end on the warm runtime (model-only's session)",
            result["end_to_end_warm_runtime_mpx_s"],
            f"{result['end_to_end_warm_runtime_mpx_s'] / result['end_to_end_mpx_s']:.2f}",
        ),
        ("model-only ceiling", result["model_only_mpx_s"], f"{1 / result['efficiency']:.2f}"),
        (
            "model-only, fresh runtime per run (as a job starts)",
            result["model_only_cold_mpx_s"],
            f"{1 / result['efficiency_vs_cold']:.2f}",
        ),
        (
            "MONAI sliding window, same runtime session",
            result["monai_mpx_s"],
            f"{1 / result['vs_monai']:.2f}",
        ),
        (
            "MONAI sliding window, fresh runtime per run",
            result["monai_cold_mpx_s"],
            f"{1 / result['vs_monai_cold']:.2f}",
        ),
        (
            "MONAI sliding window, torch module",
            result["monai_torch_mpx_s"],
            f"{1 / result['vs_monai_torch']:.2f}",
        ),
        (
            "host ceiling (zero-cost model)",
            result["host_ceiling_mpx_s"],
            f"{result['host_ceiling_mpx_s'] / result['end_to_end_mpx_s']:.2f}",
        ),
    ]
    stages = "\n".join(
        f"| {k} | {v} | {result['stage_busy_s_per_mpx'].get(k, '')} |"
        for k, v in result["stage_busy_s_per_mpx_host_ceiling"].items()
    )
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    m = result["machine"]
    (folder / f"{name}.md").write_text(
        f"# segment benchmark, {result['size']}², {result['runtime']}, {result['date']}\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB. Tile {result['tile']}"
        f" + halo {result['halo']}, batch {result['batch']}, {result['threads']} threads. "
        f"CPU used by other processes during the run: {result['foreign_cpu_s']} s; 1-min load "
        f"average at start / end {result['load_avg_1min_start_end']}. Faulting in fresh "
        f"memory: {m['memory_first_touch_s_per_gb']['hot']} s/GiB right after a free, "
        f"{m['memory_first_touch_s_per_gb']['cold']} s/GiB after "
        f"{m['memory_first_touch_s_per_gb']['idle_s']} s idle. One untimed warm-up "
        f"round of every pipeline, then {result['rounds']} timed rounds, best kept.\n\n"
        f"| pipeline | Mpx/s | relative to segloop |\n|---|---|---|\n{table}\n\n"
        f"efficiency (end-to-end / model-only) = **{result['efficiency']}** "
        f"({result['efficiency_vs_cold']} against the fresh runtime; "
        f"{result['efficiency_same_runtime']} with both on one warm runtime), "
        f"vs_monai = **{result['vs_monai']}** ({result['vs_monai_cold']} against the fresh "
        f"runtime), vs_monai_torch = {result['vs_monai_torch']}"
        + (
            f"; peak RSS segloop {result['peak_rss_mb']} MB vs MONAI "
            f"{result['monai_peak_rss_mb']} MB (each in its own process, same image).\n"
            if result["peak_rss_mb"] is not None
            else ".\n"
        )
        + (f"\nGPU: {result['gpu']} ({result['device']}).\n" if result["gpu"] else "")
        + f"\nHost ceiling {result['host_ceiling_mpx_s']} Mpx/s "
        f"({result['host_ceiling_mpx_s_per_core']} per core): {result['host_ceiling_how']}. "
        f"Halo overhead (model input px ÷ output px) {result['halo_overhead']}, window "
        f"{result['window']}. Store ÷ source file: {result['store_bytes_per_source_byte']} "
        f"(image {result['image_mode']}), {result['store_bytes_per_source_byte_copy_image']} "
        "with --copy-image.\n\n"
        "| stage | busy s per output Mpx, zero-cost model | with the model |\n|---|---|---|\n"
        f"{stages}\n\nwrite: busy summed over its tasks (two writers at once count twice); "
        "seconds with at least one write task running, per output Mpx, zero-cost model: "
        f"{result['write_busy_any_s_per_mpx_host_ceiling']}.\n"
    )
