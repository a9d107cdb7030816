"""One job's machinery, shared by ``segment`` (this process) and ``cluster`` (Dask
workers): its options, the model and runtime it opens, and ``run_stages``, which drives
read → (host or device stage set) → write over a list of shards.
"""

from __future__ import annotations

import errno
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segloop.errors import UserError
from segloop.io.formats import open_image
from segloop.io.location import Location
from segloop.io.source import ImageSource
from segloop.kernels.pre import Normalisation
from segloop.model.card import model_mpp
from segloop.model.registry import resolve_model
from segloop.pipeline.host import LocalStages, RemoteStages
from segloop.pipeline.read import ShardReader
from segloop.pipeline.resolution import for_model
from segloop.pipeline.stages import Pipeline, Stage, StageSet, StageStats, peak_rss_mb
from segloop.pipeline.write import ShardWriter
from segloop.runtimes import Runtime, TileRuntime, create_runtime
from segloop.tiling import TileGrid

ProgressFn = Callable[[int, int], None]  # (pixels done, pixels total)
#: default batch: as many windows as make ≈ 1.5 Mpx of model input (4 × 608²)
BATCH_PIXELS = 4 * 608 * 608


def default_model() -> Path:
    """Newest version of ``segloop_unet`` in ``$SEGLOOP_MODEL_REPOSITORY`` or the shipped one."""
    return resolve_model(None)


@dataclass
class SegmentOptions:
    runtime: str = "onnx"
    model: Path | str | None = None  # a file, or a model name in the repository
    tile: int = 512
    shard: int | None = None
    window: int | None = None  # inference window core (px); None: one per shard
    batch: int | None = None  # windows per model call; None: ≈ BATCH_PIXELS of input
    copy_image: bool | None = None  # None: copy unless the source is tiled and pyramidal
    #: where pre and post run: "cpu" (numba twins), "cuda" (device pipeline, torch),
    #: "sim" (the device pipeline in numba's CUDA simulator: CI rehearsal)
    device: str = "cpu"
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    read_workers: int = 2
    write_workers: int | None = None  # None: one per core
    write_processes: bool | None = None  # None: processes for jobs of ≥ 8 shards
    runtime_options: dict[str, Any] = field(default_factory=dict)  # e.g. triton url
    #: fsspec options for s3://… inputs and stores (``--storage-options``), e.g. endpoint_url
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    #: the image's level-0 µm/px (``--mpp``), overriding its metadata (pipeline.resolution)
    mpp: float | None = None


def normalisation_for(card: dict, src: ImageSource) -> Normalisation:
    inp = card["input"]
    return Normalisation(
        mean=tuple(inp["mean"]),
        std=tuple(inp["std"]),
        channels=(0, 0, 0) if src.channels == 1 else (0, 1, 2),
        max_value=255.0 if src.dtype == np.uint8 else 65535.0,
    )


def stage_set(
    rt: Runtime | TileRuntime,
    grid: TileGrid,
    norm: Normalisation,
    batch: int,
    src: ImageSource,
    device: str,
    writer: ShardWriter,
) -> StageSet:
    """The stages between read and write: remote (Triton), on the GPU (``--device cuda``
    or ``sim``, torch) or local (CPU kernels around an embedded runtime)."""
    if isinstance(rt, TileRuntime):
        if device != "cpu":
            raise UserError("--device is for --runtime torch; Triton picks its device itself")
        return RemoteStages(rt, grid, batch, writer.buffers)
    if device == "cpu":
        return LocalStages(rt, grid, norm, batch, writer.buffers, BATCH_PIXELS)
    if writer.select is not None:
        raise UserError(
            "--only unreviewed runs on the CPU stages (it rewrites single tiles); drop --device"
        )
    from segloop.pipeline.device import DeviceStages  # imports torch and numba.cuda

    return DeviceStages(rt, grid, norm, batch, src.channels, src.dtype, device, BATCH_PIXELS)


def run_stages(
    src: ImageSource,
    rt: Runtime | TileRuntime,
    grid: TileGrid,
    opts: SegmentOptions,
    shards: list[tuple[int, int]],
    writer: ShardWriter,
    out: Path | Location,
    finish: Callable[[], None] = lambda: None,
    parts: dict[tuple[int, int], list[tuple[int, int, int, int]]] | None = None,
) -> tuple[float, dict[str, Any]]:
    """read → pre → infer → post → write over ``shards`` (only the sub-boxes ``parts``
    of a shard, when given), then ``finish()`` (pyramid); (wall seconds, stage stats).
    Disk errors become a UserError."""
    norm = normalisation_for(rt.card, src)
    batch = opts.batch or grid.default_batch(BATCH_PIXELS)
    chain = stage_set(rt, grid, norm, batch, src, opts.device, writer)
    stages = [*chain.stages(), Stage("write", writer)]
    read_stats = StageStats("read")
    reader = ShardReader(src, grid, shards, opts.read_workers, read_stats, parts)
    # the heap of long-lived objects (numba, ORT, numpy, torch…) does not change during a
    # job: freeze it, or every gen-2 collection triggered by zarr's asyncio churn walks it
    # all while holding the GIL (measured: most of the write time)
    gc.freeze()
    t0 = time.perf_counter()
    try:
        try:
            Pipeline(stages, depth=chain.in_flight).run(iter(reader), StageStats("feed"))
        finally:
            writer.close()
        finish()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing {out}; free space and run the same "
                "command again to resume"
            ) from exc
        raise UserError(f"cannot write {out}: {exc}; run the same command to resume") from exc
    wall = time.perf_counter() - t0
    stats = {s.name: s.as_dict() for s in [read_stats] + [st.stats for st in stages[:-1]]}
    stats["write"] = {**writer.stats.as_dict(), **writer.describe()}
    stats["read"].update(
        decoded_chunks=len(reader.cache.decodes),
        max_decodes_per_chunk=max(reader.cache.decodes.values(), default=0),
        cache_peak_mb=round(reader.cache.peak_bytes / 2**20, 1),
        spilled_parts=reader.cache.spill.parked,
        spill_peak_mb=round(reader.cache.spill.peak_bytes / 2**20, 1),
    )
    stats["info"] = {
        "gpu_busy": chain.gpu_busy(wall),
        "halo_overhead": reader.halo_overhead and round(reader.halo_overhead, 4),
        "batch": batch,
        "window": grid.window_core,
        "cache_peak_blocks": reader.cache.peak_blocks,
    }
    return wall, stats


def job_runtime(opts: SegmentOptions) -> Runtime:
    """A new runtime for ``opts``' model (runtime name, threads, its options)."""
    return create_runtime(
        opts.runtime, resolve_model(opts.model), opts.threads, **opts.runtime_options
    )


def open_runtime(
    input_path: Path | str, opts: SegmentOptions, rt: Runtime | None = None
) -> tuple[ImageSource, Runtime]:
    """The job's image (for region reads: the level, resampled or not, at the model's
    µm/px, ``pipeline.resolution``) and runtime (``rt`` when given: one kept across jobs;
    else a new one); uint8-only runtimes refuse uint16."""
    src = open_image(input_path, opts.storage_options)
    made = rt is None
    if rt is None:
        rt = job_runtime(opts)
    try:
        if isinstance(rt, TileRuntime) and src.dtype != np.uint8:
            raise UserError(
                f"{input_path}: --runtime {opts.runtime} sends uint8 tiles; this image "
                f"is {src.dtype}: use --runtime onnx or convert it to uint8"
            )
        return for_model(src, model_mpp(rt.card), opts.mpp), rt
    except UserError:
        if made:
            rt.close()
        raise


def run_stats(wall: float, pixels: int, stages: dict, opts: SegmentOptions) -> dict[str, Any]:
    stages = dict(stages)
    info = stages.pop("info", {})
    return {
        "wall_s": round(wall, 3),
        "pixels": pixels,
        "mpx_s": round(pixels / 1e6 / wall, 3) if wall > 0 else None,
        "stages": stages,
        "threads": opts.threads,
        "batch": info.get("batch", opts.batch),
        "window": info.get("window"),
        "halo_overhead": info.get("halo_overhead"),
        "gpu_busy": info.get("gpu_busy"),
        "cache_peak_blocks": info.get("cache_peak_blocks"),
        "peak_rss_mb": peak_rss_mb(),
    }
