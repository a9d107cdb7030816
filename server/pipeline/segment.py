"""``segment``: image → OME-Zarr labels + confidence, tile by tile, stages overlapped;
``resegment``: the same for the tiles of an existing store that no human touched.

read (decoder pool) → pre (normalise + batch) → infer (runtime) → post (crop, argmax,
confidence) → write (shard assembly, manifest, pyramid). Peak memory is bounded by the
queue depths and the shards in flight, not by the image size.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segloop import __version__
from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.ome_zarr import (
    LAYERS,
    OutputStore,
    StoreLock,
    read_record,
    remove_store,
    write_record,
)
from segloop.io.source import ImageSource, open_image
from segloop.kernels.post import labels_confidence
from segloop.kernels.pre import Normalisation, normalise_into
from segloop.pipeline.manifest import Manifest
from segloop.pipeline.pyramid import PyramidBuilder
from segloop.pipeline.stages import Pipeline, Stage, StageStats, peak_rss_mb
from segloop.pipeline.tiling import Tile, TileGrid
from segloop.pipeline.uncertainty import tile_uncertainty
from segloop.runtimes import Runtime, TileRuntime, create_runtime

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"

ProgressFn = Callable[[int, int], None]  # (pixels done, pixels total)


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
    batch: int = 4
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    read_workers: int = 2
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


def _params(src: ImageSource, rt: Runtime, grid: TileGrid) -> dict[str, Any]:
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
    }


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
    changed = _diff(record.get("params", {}), params)
    if changed:
        raise UserError(
            f"{out} was made with other parameters ({'; '.join(changed)}); "
            "pass --overwrite to start over, or use the same parameters to resume"
        )
    return ("complete" if record.get("status") == "complete" else "resume"), record


TileKey = tuple[int, int]  # (ty, tx) level-0 tile = chunk


def _tile_key(t: Tile, grid: TileGrid) -> TileKey:
    return t.y0 // grid.tile, t.x0 // grid.tile


class _Reader:
    """Decoder pool: reads each shard's window (shard + halo) once, in shard order,
    ``workers`` shards ahead, and yields (tile, region, rows, cols) for its tiles (those
    in ``select`` only, when given).

    One read per shard decodes each source tile about once; reading each tile's own
    window would decode the source tiles under the halo again for every neighbour.
    """

    def __init__(
        self,
        src: ImageSource,
        grid: TileGrid,
        workers: int,
        stats: StageStats,
        select: set[TileKey] | None = None,
    ):
        self.src, self.grid, self.workers, self.stats = src, grid, workers, stats
        self.select = select
        self._lock = threading.Lock()

    def _read_shard(self, key: tuple[int, int]) -> list[tuple]:
        t0 = time.perf_counter()
        tiles = [
            t
            for t in self.grid.tiles(*key)
            if self.select is None or _tile_key(t, self.grid) in self.select
        ]
        boxes = [self.grid.window_indices(t) for t in tiles]
        r0, r1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
        c0, c1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
        region = self.src.read(r0, r1, c0, c1)
        with self._lock:
            self.stats.busy_s += time.perf_counter() - t0
        return [
            (t, region, rows + (tr0 - r0), cols + (tc0 - c0))
            for t, (tr0, _, tc0, _, rows, cols) in zip(tiles, boxes, strict=True)
        ]

    def __call__(self, shards: Iterator[tuple[int, int]]) -> Iterator[tuple]:
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="segloop-read") as pool:
            for key in shards:
                pending.append(pool.submit(self._read_shard, key))
                if len(pending) > self.workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()


class _ShardWriter:
    """Assembles tiles into shard buffers and writes each shard once, when complete.

    A full run (``select`` None) writes every layer; with a ``manifest`` it lists each
    shard there and builds the pyramid as it goes. Re-segmenting ``select`` tiles pastes
    them over the shard's current labels and confidence (the image stays). Written shards
    are collected in ``rewritten``.
    """

    def __init__(
        self,
        store: OutputStore,
        progress: Callable[[int], None],
        model_version: int,
        manifest: Manifest | None = None,
        select: set[TileKey] | None = None,
    ):
        self.store, self.grid, self.manifest = store, store.grid, manifest
        self.pyramid = PyramidBuilder(store, manifest)
        self.progress, self.model_version, self.select = progress, model_version, select
        self.versions = None if select is None else store.read_tiles("model_version")
        self.open: dict[tuple[int, int], list] = {}
        self.rewritten: set[tuple[int, int]] = set()

    def _open(self, key: tuple[int, int]) -> list:
        box = self.grid.shard_box(*key)
        if self.select is None:
            shape = (box[1] - box[0], box[3] - box[2])
            return [
                np.zeros((self.store.channels, *shape), self.store.dtype),
                np.zeros(shape, np.uint8),
                np.zeros(shape, np.uint8),
                len(self.grid.tiles(*key)),
            ]
        todo = sum(_tile_key(t, self.grid) in self.select for t in self.grid.tiles(*key))
        return [
            None,
            self.store.read("segmentation", 0, box),
            self.store.read("confidence", 0, box),
            todo,
        ]

    def __call__(self, item) -> list:
        t, core, labels, conf = item
        s = self.grid.shard
        key = (t.y0 // s, t.x0 // s)
        if key not in self.open:
            self.open[key] = self._open(key)
        buf = self.open[key]
        y, x = t.y0 - key[0] * s, t.x0 - key[1] * s
        if buf[0] is not None:
            buf[0][:, y : y + t.h, x : x + t.w] = np.moveaxis(core, -1, 0)
        buf[1][y : y + t.h, x : x + t.w] = labels
        buf[2][y : y + t.h, x : x + t.w] = conf
        if self.versions is not None:
            self.versions[_tile_key(t, self.grid)] = self.model_version
        buf[3] -= 1
        if buf[3] == 0:
            self._finish(key, buf[:3])
            del self.open[key]
        self.progress(t.h * t.w)
        return []

    def _finish(self, key: tuple[int, int], arrays: list) -> None:
        box = self.grid.shard_box(*key)
        for layer, data in zip(LAYERS, arrays, strict=True):
            if data is not None:
                self.store.write(layer, 0, box, data)
        doubt = tile_uncertainty(arrays[2], self.grid.tile)
        self.store.write_tiles("uncertainty", *key, doubt)
        if self.versions is None:
            versions = np.full(doubt.shape, self.model_version, np.uint16)
        else:
            per = self.grid.shard // self.grid.tile
            versions = self.versions[
                key[0] * per : (key[0] + 1) * per, key[1] * per : (key[1] + 1) * per
            ]
        self.store.write_tiles("model_version", *key, versions)
        self.rewritten.add(key)
        if self.manifest is not None:
            self.manifest.add((0, *key))
            self.pyramid.shard_done((0, *key))


def _run_stages(
    src: ImageSource,
    rt: Runtime,
    grid: TileGrid,
    opts: SegmentOptions,
    shards: Iterator[tuple[int, int]],
    writer: _ShardWriter,
    out: Path,
    finish: Callable[[], None] = lambda: None,
    select: set[TileKey] | None = None,
) -> tuple[float, dict[str, Any]]:
    """read → pre → infer → post → write over ``shards``, then ``finish()`` (pyramid);
    (wall seconds, stage stats). Disk errors become a UserError."""
    norm = normalisation_for(rt.card, src)
    halo, core, window = grid.halo, grid.tile, grid.window
    batch: list[tuple] = []
    remote = isinstance(rt, TileRuntime)  # pre + network + post run on a server

    def emit() -> list:
        if not batch:
            return []
        if remote:  # uint8 windows on the wire: gather the reflect-padded windows only
            arr = np.stack([region[np.ix_(rows, cols)] for _, region, rows, cols in batch])
        else:
            arr = np.empty((len(batch), 3, window, window), np.float32)
            for i, (_, region, rows, cols) in enumerate(batch):
                normalise_into(region, rows, cols, norm, arr[i])
        cores = [
            (t, region[rows[halo] : rows[halo] + t.h, cols[halo] : cols[halo] + t.w])
            for t, region, rows, cols in batch
        ]
        batch.clear()
        return [(cores, arr)]

    def pre(item) -> list:
        batch.append(item)
        return emit() if len(batch) >= opts.batch else []

    def infer(item) -> list:
        cores, arr = item
        return [(cores, rt.submit(arr) if remote else rt.run(arr))]

    def post(item) -> list:
        cores, out = item
        labels, conf = out.result() if remote else labels_confidence(out, halo, core)
        return [
            (t, c, labels[i, : t.h, : t.w], conf[i, : t.h, : t.w]) for i, (t, c) in enumerate(cores)
        ]

    stages = [
        Stage("pre", pre, flush=emit),
        Stage("infer", infer),
        Stage("post", post),
        Stage("write", writer),
    ]
    read_stats = StageStats("read")
    t0 = time.perf_counter()
    try:
        Pipeline(stages, depth=getattr(rt, "in_flight", 4)).run(
            _Reader(src, grid, opts.read_workers, read_stats, select)(shards), read_stats
        )
        finish()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing {out}; free space and run the same "
                "command again to resume"
            ) from exc
        raise UserError(f"cannot write {out}: {exc}; run the same command to resume") from exc
    wall = time.perf_counter() - t0
    return wall, {s.name: s.as_dict() for s in [read_stats] + [st.stats for st in stages]}


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
    return {
        "wall_s": round(wall, 3),
        "pixels": pixels,
        "mpx_s": round(pixels / 1e6 / wall, 3) if wall > 0 else None,
        "stages": stages,
        "threads": opts.threads,
        "batch": opts.batch,
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
        src.height, src.width, opts.tile, card["halo"], card["input"]["multiple_of"], opts.shard
    )
    params = _params(src, rt, grid)
    action, record = _prepare_output(out, params, opts.overwrite)
    if action == "complete":
        rt.close()
        return {**(record or {}), "status": "already-complete", "output": str(out)}
    if action == "create":
        store = OutputStore.create(out, grid, src.channels, src.dtype)
        record = {
            "segloop_version": __version__,
            "status": "running",
            "params": params,
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
            writer = _ShardWriter(store, advance, version, manifest)
            todo = (key for key in grid.shards() if (0, *key) not in manifest)
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
            grid = TileGrid(src.height, src.width, g["tile"], rt.card["halo"], g["shard"])
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
            writer = _ShardWriter(store, _progress(progress, 0, total), version, select=select)
            per = grid.shard // grid.tile
            shards = sorted({(ty // per, tx // per) for ty, tx in select})
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
                iter(shards),
                writer,
                out,
                finish=lambda: writer.pyramid.rebuild(writer.rewritten, LAYERS[1:]),
                select=select,
            )
        finally:
            rt.close()
        ReviewDB.bump_versions(out, select, grid.levels)
        record["generation"] = record.get("generation", 0) + 1
        entry.update(status="complete", stats=_run_stats(wall, total, stages, opts))
        write_record(out, record)
    return {"output": str(out), "status": "complete", **entry}
