"""``segment``: image → OME-Zarr labels + confidence, tile by tile, stages overlapped;
``resegment``: the same for the tiles of an existing store that no human touched.

read (decoder pool) → pre (normalise + batch) → infer (runtime) → post (crop, argmax,
confidence) → write (shard assembly, manifest, pyramid). Peak memory is bounded by the
queue depths and the shards in flight, not by the image size.
"""

from __future__ import annotations

import errno
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segloop import __version__
from segloop.errors import UserError
from segloop.io.location import Location, is_url
from segloop.io.ome_zarr import (
    LAYERS,
    OutputStore,
    StoreLock,
    read_record,
    remove_store,
    write_record,
)
from segloop.io.source import ImageSource, open_image
from segloop.kernels.post import windows_into
from segloop.kernels.pre import Normalisation, normalise_windows
from segloop.pipeline.manifest import Manifest
from segloop.pipeline.pyramid import PyramidBuilder
from segloop.pipeline.read import ShardReader, ShardWork
from segloop.pipeline.stages import Pipeline, Stage, StageStats, peak_rss_mb
from segloop.pipeline.tiling import TileGrid
from segloop.pipeline.write import ShardWriter
from segloop.runtimes import Runtime, TileRuntime, create_runtime

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"

ProgressFn = Callable[[int, int], None]  # (pixels done, pixels total)
#: default batch: as many windows as make ≈ 1.5 Mpx of model input (4 × 608²)
BATCH_PIXELS = 4 * 608 * 608


def default_model() -> Path:
    """Newest version of ``segloop_unet`` in ``$SEGLOOP_MODEL_REPOSITORY`` or the repo's."""
    repo = Path(os.environ.get("SEGLOOP_MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY))
    versions = sorted(
        (
            int(p.name)
            for p in (repo / "segloop_unet").glob("[0-9]*")
            if (p / "model.onnx").exists()
        ),
        reverse=True,
    )
    if not versions:
        raise UserError(
            f"no model found under {repo}/segloop_unet/<version>/model.onnx; "
            "pass --model or run `segloop train`"
        )
    return repo / "segloop_unet" / str(versions[0]) / "model.onnx"


@dataclass
class SegmentOptions:
    runtime: str = "onnx"
    model: Path | None = None
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
    overwrite: bool = False


def normalisation_for(card: dict, src: ImageSource) -> Normalisation:
    inp = card["input"]
    return Normalisation(
        mean=tuple(inp["mean"]),
        std=tuple(inp["std"]),
        channels=(0, 0, 0) if src.channels == 1 else (0, 1, 2),
        max_value=255.0 if src.dtype == np.uint8 else 65535.0,
    )


def image_record(src: ImageSource, copied: bool) -> dict[str, Any]:
    """Where the store's image layer lives: ``copy`` (the store's own ``0/ 1/ …``) or
    ``source`` (read in place from the input: its path or URL, as absolute as it can be
    made, and the fingerprint a reader checks before trusting it)."""
    if copied:
        return {"mode": "copy"}
    where = src.path if is_url(src.path) else Path(src.path).resolve()
    return {
        "mode": "source",
        "path": str(where),
        "fingerprint": src.fingerprint,
        "levels": src.pyramid_levels,
    }


def _params(src: ImageSource, rt: Runtime, grid: TileGrid, device: str = "cpu") -> dict[str, Any]:
    """Everything that determines the output bits; a resumed run must match them."""
    return {
        "source": {
            "path": str(src.path),
            "fingerprint": src.fingerprint,
            "shape": [src.height, src.width],
            "channels": src.channels,
            "dtype": str(src.dtype),
        },
        "model": {"sha256": rt.card["sha256"], "version": rt.card.get("version")},
        "runtime": rt.name,
        "tile": grid.tile,
        "halo": grid.halo,
        "shard": grid.shard,
        "window": grid.window_core,
    } | ({"device": device} if device != "cpu" else {})


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and k != "path":
            out.append(f"{prefix}{k} ({va} → {vb})")
    return out


def _prepare_output(out: Location, params: dict, overwrite: bool) -> tuple[str, dict | None]:
    """Decide what to do with ``out``: 'create', 'resume' or 'complete'."""
    if out.exists() and overwrite:
        remove_store(out)
    if not out.exists():
        try:
            out.makedirs()
        except OSError as exc:
            raise UserError(f"cannot create output {out}: {exc.strerror or exc}") from exc
        if out.local and not os.access(out.path, os.W_OK):
            raise UserError(f"output folder {out} is not writable")
        return "create", None
    record = read_record(out)
    if record is None:
        raise UserError(
            f"{out} already exists and is not a segloop store; "
            "pass --overwrite to replace it or choose another -o"
        )
    old = record.get("params", {})
    if "window" not in old and "tile" in old:  # stores made before windows: one per chunk
        old = {**old, "window": old["tile"]}
    changed = _diff(old, params)
    if changed:
        raise UserError(
            f"{out} was made with other parameters ({'; '.join(changed)}); "
            "pass --overwrite to start over, or use the same parameters to resume"
        )
    return ("complete" if record.get("status") == "complete" else "resume"), record


def default_batch(grid: TileGrid) -> int:
    """Windows per model call when ``--batch`` is not given: ≈ ``BATCH_PIXELS`` of input."""
    return max(1, BATCH_PIXELS // (grid.window_core + 2 * grid.halo) ** 2)


def batches(work: ShardWork, size: int) -> Iterator[list[int]]:
    """Window indices of one shard in batches of at most ``size`` same-shape windows."""
    group: list[int] = []
    for i, w in enumerate(work.windows):
        if group and (
            len(group) == size
            or (w.sh, w.sw) != (work.windows[group[0]].sh, work.windows[group[0]].sw)
        ):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _run_stages(
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
    halo = grid.halo
    remote = isinstance(rt, TileRuntime)  # pre + network + post run on a server
    batch = opts.batch or default_batch(grid)

    def pre(work: ShardWork) -> Iterator[tuple]:
        for idx in batches(work, batch):
            rows = np.stack([work.maps[i][0] for i in idx])
            cols = np.stack([work.maps[i][1] for i in idx])
            if remote:  # uint8 windows on the wire: gather the reflect-padded windows only
                arr = work.region[rows[:, :, None], cols[:, None, :]]
            else:
                arr = np.empty((len(idx), 3, rows.shape[1], cols.shape[1]), np.float32)
                normalise_windows(work.region, rows, cols, norm, arr)
            yield work, idx, arr

    def infer(item: tuple) -> list:
        work, idx, arr = item
        return [(work, idx, rt.submit(arr) if remote else rt.run(arr))]

    def post(item: tuple) -> list:
        work, idx, out = item
        if work.labels is None:
            writer.buffers(work)
            work.pending = len(work.windows)
        wins = [work.windows[i] for i in idx]
        y0, x0 = work.box[0], work.box[2]
        origins = np.array([(w.y0 - y0, w.x0 - x0) for w in wins], np.intp)
        sizes = np.array([(w.h, w.w) for w in wins], np.intp)
        if remote:
            labels, conf = out.result()
            for (oy, ox), (h, w), lab, cf in zip(origins, sizes, labels, conf, strict=True):
                work.labels[oy : oy + h, ox : ox + w] = lab[:h, :w]
                work.confidence[oy : oy + h, ox : ox + w] = cf[:h, :w]
        else:
            windows_into(out, halo, origins, sizes, work.labels, work.confidence)
        work.pending -= len(idx)
        return [work] if work.pending == 0 else []

    on_device = opts.device != "cpu" and not remote and writer.select is None
    if on_device:
        from segloop.pipeline.device import DeviceStages

        dev = DeviceStages(rt, grid, norm, batch, src.channels, src.dtype, opts.device)
        stages = [*dev.stages(), Stage("write", writer)]
    else:
        stages = [
            Stage("pre", pre),
            Stage("infer", infer),
            Stage("post", post),
            Stage("write", writer),
        ]
    read_stats = StageStats("read")
    reader = ShardReader(src, grid, shards, opts.read_workers, read_stats, parts)
    # big windows: fewer batches in flight (each holds its input and its logits)
    depth = getattr(
        rt, "in_flight", 4 if batch * (grid.window_core + 2 * halo) ** 2 <= BATCH_PIXELS else 2
    )
    # the heap of long-lived objects (numba, ORT, numpy, torch…) does not change during a
    # job: freeze it, or every gen-2 collection triggered by zarr's asyncio churn walks it
    # all while holding the GIL (measured: most of the write time)
    gc.freeze()
    t0 = time.perf_counter()
    try:
        try:
            Pipeline(stages, depth=depth).run(iter(reader), StageStats("feed"))
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
    )
    stats["info"] = {
        "gpu_busy": dev.gpu_busy(wall) if on_device else None,
        "halo_overhead": reader.halo_overhead and round(reader.halo_overhead, 4),
        "batch": batch,
        "window": grid.window_core,
        "cache_peak_blocks": getattr(reader.cache, "peak_blocks", 0),
    }
    return wall, stats


def _open_runtime(input_path: Path | str, opts: SegmentOptions) -> tuple[ImageSource, Runtime]:
    src = open_image(input_path)
    rt = create_runtime(
        opts.runtime, opts.model or default_model(), opts.threads, **opts.runtime_options
    )
    if isinstance(rt, TileRuntime) and src.dtype != np.uint8:
        rt.close()
        raise UserError(
            f"{input_path}: --runtime {opts.runtime} sends uint8 tiles; this image "
            f"is {src.dtype}: use --runtime onnx or convert it to uint8"
        )
    return src, rt


def _run_stats(wall: float, pixels: int, stages: dict, opts: SegmentOptions) -> dict[str, Any]:
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


def segment(
    input_path: Path | str,
    out: Path | str | Location,
    opts: SegmentOptions,
    progress: ProgressFn | None = None,
    cluster: Any = None,
) -> dict[str, Any]:
    """Segment ``input_path`` into the store ``out``; returns the run summary.

    Resumes an unfinished store made with the same parameters; a finished one is left
    as it is (summary ``status: already-complete``). With a Dask ``cluster`` (a
    ``distributed.Client``) the shards are segmented by its workers (``cluster.py``).
    """
    out = Location.of(out)
    src, rt = _open_runtime(input_path, opts)
    card = rt.card
    grid = TileGrid.create(
        src.height,
        src.width,
        opts.tile,
        card["halo"],
        card["input"]["multiple_of"],
        opts.shard,
        opts.window,
    )
    params = _params(src, rt, grid, opts.device)
    action, record = _prepare_output(out, params, opts.overwrite)
    if action == "complete":
        rt.close()
        return {**(record or {}), "status": "already-complete", "output": str(out)}
    if action == "create":
        copy = opts.copy_image if opts.copy_image is not None else not src.servable
        store = OutputStore.create(out, grid, src.channels, src.dtype, copy)
        record = {
            "segloop_version": __version__,
            "status": "running",
            "params": params,
            "image": image_record(src, copy),
            "model": {
                k: card[k]
                for k in ("name", "version", "classes", "sha256", "receptive_radius", "halo")
            },
        }
        write_record(out, record)
    else:
        store = OutputStore(out, grid, src.channels, src.dtype)
    manifest = Manifest(out)
    total = src.height * src.width
    done_px = sum(
        (b[1] - b[0]) * (b[3] - b[2])
        for b in (grid.shard_box(sy, sx) for sy, sx in grid.shards() if (0, sy, sx) in manifest)
    )
    advance = _progress(progress, done_px, total)
    version = card.get("version") or 0
    try:
        if cluster is None:
            todo = [key for key in grid.shards() if (0, *key) not in manifest]
            writer = ShardWriter(
                store, advance, version, manifest, workers=opts.write_workers,
                processes=opts.write_processes, expect=len(todo),
            )  # fmt: skip
            wall, stages = _run_stages(
                src, rt, grid, opts, todo, writer, out, finish=writer.pyramid.complete
            )
        else:
            from segloop.pipeline.cluster import run_on_cluster

            wall, tasks = run_on_cluster(
                cluster, input_path, out, opts, store, manifest, version, advance
            )
            stages = {}  # timed per task, inside the workers
    finally:
        manifest.close()
        rt.close()
    store.write_ome_metadata(card["classes"], card["colors"])
    stats = {**_run_stats(wall, total - done_px, stages, opts), "resumed": action == "resume"}
    if cluster is not None:
        stats["cluster"] = tasks
    record = {
        **(record or {}),
        "status": "complete",
        "stats": stats,
        "grid": {"levels": grid.levels, "tile": grid.tile, "halo": grid.halo, "shard": grid.shard},
    }
    write_record(out, record)
    return {"output": str(out), **record}


def _progress(progress: ProgressFn | None, done: int, total: int) -> Callable[[int], None]:
    counter = [done]

    def advance(n: int) -> None:
        counter[0] += n
        if progress:
            progress(counter[0], total)

    if progress:
        progress(done, total)
    return advance


def resegment(
    input_path: Path,
    out: Path,
    opts: SegmentOptions,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Re-segment the tiles of the finished store ``out`` that no human edited, accepted
    or marked corrected (``--only unreviewed``), with ``opts``' model; human work is
    never overwritten. Bumps the rewritten chunks' versions in the review database and
    the store's ``generation`` (cached tiles go stale) and appends to ``history``.
    """
    from segloop.review.db import ReviewDB

    if Location.of(out).path is None:
        raise UserError(f"{out}: --only unreviewed works on a local store (the review copy)")
    record = read_record(out)
    if record is None or record.get("status") != "complete":
        raise UserError(
            f"{out} is not a finished segloop store; --only unreviewed re-segments an "
            "existing store (segment it first)"
        )
    with StoreLock(out):
        src, rt = _open_runtime(input_path, opts)
        try:
            if src.fingerprint != record["params"]["source"]["fingerprint"]:
                raise UserError(
                    f"{out} was made from another image than {input_path}; "
                    "pass the image the store was segmented from"
                )
            g = record["grid"]
            if rt.card["halo"] % rt.card["input"]["multiple_of"]:
                raise UserError(f"model {rt.card['path']}: halo is not a multiple of its input")
            multiple = rt.card["input"]["multiple_of"]
            grid = TileGrid(
                src.height, src.width, g["tile"], rt.card["halo"], g["shard"], None, multiple
            )
            store = OutputStore(out, grid, src.channels, src.dtype)
            human = ReviewDB.human_tiles(out)
            ny, nx = store.tile_grid
            select = {(ty, tx) for ty in range(ny) for tx in range(nx)} - human
            total = sum(
                (min(grid.height, (ty + 1) * grid.tile) - ty * grid.tile)
                * (min(grid.width, (tx + 1) * grid.tile) - tx * grid.tile)
                for ty, tx in select
            )
            version = rt.card.get("version") or 0
            writer = ShardWriter(
                store, _progress(progress, 0, total), version, select=select,
                workers=opts.write_workers,
            )  # fmt: skip
            per = grid.shard // grid.tile
            parts: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
            for ty, tx in sorted(select):
                y0, x0 = ty * grid.tile, tx * grid.tile
                box = (y0, min(grid.height, y0 + grid.tile), x0, min(grid.width, x0 + grid.tile))
                parts.setdefault((ty // per, tx // per), []).append(box)
            entry = {
                "only": "unreviewed",
                "model": {"version": version, "sha256": rt.card["sha256"]},
                "runtime": rt.name,
                "started": time.time(),
                "status": "running",
                "tiles": sorted([ty, tx] for ty, tx in select),
                "kept_human_tiles": sorted([ty, tx] for ty, tx in human),
            }
            record.setdefault("history", []).append(entry)
            write_record(out, record)
            wall, stages = _run_stages(
                src,
                rt,
                grid,
                opts,
                sorted(parts),
                writer,
                out,
                finish=lambda: PyramidBuilder(store, None).rebuild(writer.rewritten, LAYERS[1:]),
                parts=parts,
            )
        finally:
            rt.close()
        ReviewDB.bump_versions(out, select, grid.levels)
        record["generation"] = record.get("generation", 0) + 1
        entry.update(status="complete", stats=_run_stats(wall, total, stages, opts))
        write_record(out, record)
    return {"output": str(out), "status": "complete", **entry}
