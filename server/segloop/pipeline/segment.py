"""``segment``: image → OME-Zarr labels + confidence, tile by tile, stages overlapped;
``resegment``: the same for the tiles of an existing store that no human touched.

Here: deciding what to do with the output (create, resume, complete), the run record
and the store's metadata; the stages themselves run in ``job.run_stages``. Peak memory
is bounded by the queue depths and the shards in flight, not by the image size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from segloop.io.source import ImageSource
from segloop.model.card import model_mpp
from segloop.pipeline.job import (
    BATCH_PIXELS,
    ProgressFn,
    SegmentOptions,
    default_model,
    normalisation_for,
    open_runtime,
    run_stages,
    run_stats,
)
from segloop.pipeline.manifest import Manifest
from segloop.pipeline.pyramid import PyramidBuilder
from segloop.pipeline.resolution import pixel_size_record
from segloop.pipeline.write import ShardWriter
from segloop.runtimes import Runtime
from segloop.tiling import TileGrid

#: the public face of a job: options, the default model, and the two entry points
__all__ = [
    "BATCH_PIXELS",
    "SegmentOptions",
    "default_model",
    "normalisation_for",
    "resegment",
    "segment",
]


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
            "mpp": list(src.mpp) if src.mpp else None,
            "level": src.source_level,
            "resampled": src.resampled,
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


def segment(
    input_path: Path | str,
    out: Path | str | Location,
    opts: SegmentOptions,
    progress: ProgressFn | None = None,
    cluster: Any = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Segment ``input_path`` into the store ``out``; returns the run summary.

    Resumes an unfinished store made with the same parameters; a finished one is left
    as it is (summary ``status: already-complete``). With a Dask ``cluster`` (a
    ``distributed.Client``) the shards are segmented by its workers (``cluster.py``).
    ``runtime``: an open runtime for ``opts``' model, kept open after (``segment-batch``
    runs every slide on one, so the model loads and fills its memory once).
    """
    out = Location.of(out, opts.storage_options)
    src, rt = open_runtime(input_path, opts, runtime)
    close = rt.close if runtime is None else lambda: None
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
        close()
        return {**(record or {}), "status": "already-complete", "output": str(out)}
    if action == "create":
        copy = opts.copy_image if opts.copy_image is not None else not src.servable
        # another level than the slide's level 0: a viewer reading the slide in place
        # would show the wrong pixels, so the store holds the image it was segmented from
        copy = copy or bool(src.source_level or src.resampled)
        store = OutputStore.create(out, grid, src.channels, src.dtype, copy)
        record = {
            "segloop_version": __version__,
            "status": "running",
            "params": params,
            "image": image_record(src, copy),
            "pixel_size": pixel_size_record(src, model_mpp(card)),
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
            todo = [key for key in grid.shard_order() if (0, *key) not in manifest]
            writer = ShardWriter(
                store, advance, version, manifest, workers=opts.write_workers,
                processes=opts.write_processes, expect=len(todo),
            )  # fmt: skip
            wall, stages = run_stages(
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
        close()
    store.write_ome_metadata(card["classes"], card["colors"], src.mpp)
    stats = {**run_stats(wall, total - done_px, stages, opts), "resumed": action == "resume"}
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
        src, rt = open_runtime(input_path, opts)
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
            wall, stages = run_stages(
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
        entry.update(status="complete", stats=run_stats(wall, total, stages, opts))
        write_record(out, record)
    return {"output": str(out), "status": "complete", **entry}
