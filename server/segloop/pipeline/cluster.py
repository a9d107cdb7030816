"""``segment --dask``: the same pipeline, one Dask task per band of shards.

The client prepares the store exactly as a local run (create or resume), then submits
one task per row of unfinished shards. A task opens the image and the model in its
worker (kept per worker process for the next task), runs read → pre → infer → post →
write over its shards and returns their keys. Tasks never share a shard and rewrite
whole shards, so a task that Dask re-runs after losing a worker writes the same bytes.
The client lists finished shards in the manifest (resume works across cluster runs),
feeds the progress bar and builds the pyramid as bands finish.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segloop.errors import UserError
from segloop.io.location import Location, is_url

if TYPE_CHECKING:
    from distributed import Client

    from segloop.io.ome_zarr import OutputStore
    from segloop.pipeline.job import SegmentOptions
    from segloop.pipeline.manifest import Manifest
    from segloop.tiling import TileGrid

_OPEN: dict[tuple, tuple] = {}  # per worker process: (image, model options) → (src, rt)
_OPEN_LOCK = threading.Lock()


def connect(scheduler: str) -> Client:
    """``local:N`` → a LocalCluster of N single-threaded worker processes on this machine;
    ``tcp://host:8786`` → an existing scheduler."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.removeprefix("local:"))
            if n < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--dask {scheduler}: local:N needs N ≥ 1 worker processes") from None
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster)
    try:
        return Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise UserError(
            f"--dask {scheduler}: no Dask scheduler answers ({exc}); start one or use local:N"
        ) from None


def _opened(input_path: Path | str, opts: SegmentOptions) -> tuple:
    from segloop.pipeline.job import open_runtime

    key = (str(input_path), opts.runtime, str(opts.model), opts.threads, repr(opts.runtime_options))
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = open_runtime(input_path, opts)
        return _OPEN[key]


def segment_band(
    input_path: Path | str,
    out: Location,
    opts: SegmentOptions,
    grid: TileGrid,
    shards: list[tuple[int, int]],
    model_version: int,
) -> dict[str, Any]:
    """Worker side: segment ``shards`` (level 0 + per-tile arrays) into the store ``out``."""
    from segloop.io.ome_zarr import OutputStore
    from segloop.pipeline.job import run_stages
    from segloop.pipeline.write import ShardWriter

    src, rt = _opened(input_path, opts)
    store = OutputStore(out, grid, src.channels, src.dtype)
    writer = ShardWriter(store, lambda n: None, model_version, workers=opts.write_workers)
    wall, _ = run_stages(src, rt, grid, opts, shards, writer, out)
    return {"shards": sorted(writer.rewritten), "wall_s": wall, "pid": os.getpid()}


def run_on_cluster(
    client: Client,
    input_path: Path | str,
    out: Location,
    opts: SegmentOptions,
    store: OutputStore,
    manifest: Manifest,
    model_version: int,
    advance,
) -> tuple[float, dict[str, Any]]:
    """Client side: submit the bands of unfinished shards, list them as they finish, build
    the pyramid; (wall seconds, summary of the tasks)."""
    from distributed import as_completed

    from segloop.pipeline.pyramid import PyramidBuilder

    grid = store.grid
    bands: dict[int, list[tuple[int, int]]] = {}
    for sy, sx in grid.shards():
        if (0, sy, sx) not in manifest:
            bands.setdefault(sy, []).append((sy, sx))
    pyramid = PyramidBuilder(store, manifest)
    t0 = time.perf_counter()
    futures = [
        client.submit(
            segment_band,
            input_path if is_url(input_path) else Path(input_path).resolve(),
            out if not out.local else Location(out.path.resolve(), out.options),
            opts,
            grid,
            shards,
            model_version,
            key=f"segloop-band-{out.name}-{sy}-{time.time_ns()}",
            retries=2,
            pure=False,
        )
        for sy, shards in sorted(bands.items())
    ]
    busy, workers = 0.0, set()
    try:
        for future in as_completed(futures):
            result = future.result()
            busy += result["wall_s"]
            workers.add(result["pid"])
            for sy, sx in result["shards"]:
                manifest.add((0, sy, sx))
                box = grid.shard_box(sy, sx)
                advance((box[1] - box[0]) * (box[3] - box[2]))
            for sy, sx in result["shards"]:
                pyramid.shard_done((0, sy, sx))
        pyramid.complete()
    finally:
        for f in futures:
            f.cancel()
    wall = time.perf_counter() - t0
    return wall, {"tasks": len(futures), "task_busy_s": round(busy, 3), "workers": len(workers)}
