"""The learner process: ``python -m segloop.learn.worker JOB.json`` (started by
``segloop serve --learn``, one round at a time).

It runs at the lowest CPU priority (nice 19) with ``threads`` torch / ONNX Runtime
threads and an address-space limit of ``memory_mb``, so the review server's tiles and
edits keep their latency. A training round fine-tunes the served version on the
exported corrections with synthetic replay, validates the result and its parent on the
same held-out data, and writes it into the model repository: as the next version if it
is not worse (``gate``), else set aside in ``<model>/rejected/<N>/``. A served version
is loaded on Triton (``--runtime triton``) and then predicts the round's tiles, nearest
first, shard by shard, into the prediction archive (``archive.py``).

It tells the server what happened as JSON lines on stdout (``started``, ``trained``,
``batch``, ``done``); its log goes to stderr. It never writes the store's arrays or
its database: the server applies each batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from segloop.learn.archive import Archive
from segloop.learn.job import Job, decode
from segloop.review.image import Prediction
from segloop.scores import mean_iou


def emit(event: dict[str, Any]) -> None:
    """One event line to the server."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def limit(job: Job) -> None:
    """The job's CPU priority (``idle``: ``SCHED_IDLE``, it runs when a core is idle, and
    nice 19 where that policy is refused; ``low``: nice 19) and a memory ceiling for this
    process (threads started later inherit both); killed when the server dies."""
    if job.priority in ("idle", "low"):
        os.nice(19)
    if job.priority == "idle":
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if sys.platform.startswith("linux"):  # die with the server, even a SIGKILLed one
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # it died before that
            sys.exit(1)
    size = job.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (size, size))


def gate(before: dict, after: dict, job: Job) -> tuple[bool, str]:
    """Whether the fine-tuned model (``after``) may replace its parent (``before``): the
    mean IoU on the held-out corrections may not fall by more than ``tolerance``, and no
    in-distribution class IoU may drop by more than ``id_drop``. (accepted, why)."""
    b, a = mean_iou(before["corrections"]), mean_iou(after["corrections"])
    if a < b - job.tolerance:
        return False, f"held-out corrections mean IoU {a:.3f} < parent's {b:.3f}"
    for cls, parent in before["in_distribution"].items():
        now = after["in_distribution"][cls]
        if now < parent - job.id_drop:
            return (
                False,
                f"in-distribution {cls} IoU {now:.3f} < parent's {parent:.3f} − {job.id_drop}",
            )
    return True, f"held-out corrections mean IoU {b:.3f} → {a:.3f}; in distribution kept"


def train(job: Job) -> tuple[bool, Path]:
    """Fine-tune, gate and publish; (accepted, the new model.onnx)."""
    import torch

    from segloop.model.finetune import finetune, publish

    torch.set_num_threads(job.threads)
    repo = Path(job.repository)
    parent = repo / job.name / str(job.parent) / "model.onnx"
    t0 = time.time()
    model, info = finetune(
        parent,
        Path(job.corrections),
        steps=job.steps,
        batch=job.batch,
        patch=job.patch,
        replay=job.replay,
        lr=job.lr,
        seed=job.seed,
        held_out=job.held_out,
        validation_px=job.validation_px,
        log=log,
    )
    accepted, why = gate(info["before"], info["after"], job)
    info["gate"] = {"accepted": accepted, "why": why}
    path = publish(model, info, repo, job.name, job.version, None if accepted else "rejected")
    if accepted and job.runtime == "triton":
        from segloop.model.registry import triton_names
        from segloop.triton.server import load_version

        load_version(job.url, triton_names(job.name).net, job.version)
    emit(
        {
            "event": "trained",
            "version": job.version,
            "parent": job.parent,
            "accepted": accepted,
            "why": why,
            "model": str(path),
            "before": info["before"],
            "after": info["after"],
            "tiles": info["corrections"]["tiles"],
            "held_out": info["corrections"]["held_out"],
            "steps": info["steps"],
            "seconds": round(time.time() - t0, 1),
        }
    )
    log(f"v{job.version}: {why}")
    return accepted, path


class PredictionSink:
    """The write stage of a prediction run (what ``ShardWriter`` is to ``segment``):
    each shard's selected tiles → the version's archive, then one ``batch`` event."""

    def __init__(self, archive: Archive, grid, select: set[tuple[int, int]]) -> None:
        from segloop.pipeline.stages import StageStats

        self.archive, self.grid, self.select = archive, grid, select
        self.stats = StageStats("write")

    def buffers(self, work) -> None:
        y0, y1, x0, x1 = work.box
        work.labels = np.zeros((y1 - y0, x1 - x0), np.uint8)
        work.confidence = np.zeros((y1 - y0, x1 - x0), np.uint8)

    def __call__(self, work) -> list:
        from segloop.pipeline.uncertainty import tile_uncertainty

        t0 = time.perf_counter()
        y0, _, x0, _ = work.box
        t = self.grid.tile
        out = {}
        for tile in self.grid.tiles(*work.key):
            key = (tile.y0 // t, tile.x0 // t)
            if key not in self.select:
                continue
            rows = slice(tile.y0 - y0, tile.y0 - y0 + tile.h)
            cols = slice(tile.x0 - x0, tile.x0 - x0 + tile.w)
            labels, conf = work.labels[rows, cols].copy(), work.confidence[rows, cols].copy()
            doubt = float(tile_uncertainty(conf, t)[0, 0])
            out[key] = Prediction(labels, conf, doubt, self.archive.version)
        self.archive.write(out)
        emit(
            {
                "event": "batch",
                "version": self.archive.version,
                "tiles": [[ty, tx, p.uncertainty] for (ty, tx), p in out.items()],
            }
        )
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.items += 1
        return []

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}


def predict(job: Job, model: Path) -> int:
    """Predict ``job.tiles`` with ``model`` (shard by shard, in the order of their first
    tile), each shard's tiles into the archive; the number of tiles predicted."""
    from segloop.io.formats import open_image
    from segloop.io.ome_zarr import read_record
    from segloop.pipeline.job import SegmentOptions, run_stages
    from segloop.runtimes import create_runtime
    from segloop.tiling import TileGrid

    store = Path(job.store)
    record = read_record(store)
    image = record["image"]
    src = open_image(image["path"] if image["mode"] == "source" else str(store))
    options = {"url": job.url} if job.runtime == "triton" else {}
    rt = create_runtime(job.runtime, model, job.threads, **options)
    try:
        g = record["grid"]
        grid = TileGrid(
            src.height, src.width, g["tile"], rt.card["halo"], g["shard"], None,
            rt.card["input"]["multiple_of"],
        )  # fmt: skip
        per = grid.shard // grid.tile
        parts: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        for ty, tx in job.tiles:  # dicts keep the order: shards by their first tile
            y0, x0 = ty * grid.tile, tx * grid.tile
            box = (y0, min(grid.height, y0 + grid.tile), x0, min(grid.width, x0 + grid.tile))
            parts.setdefault((ty // per, tx // per), []).append(box)
        archive = Archive(store, job.version, (src.height, src.width), grid.tile)
        sink = PredictionSink(archive, grid, {tuple(t) for t in job.tiles})
        opts = SegmentOptions(
            runtime=job.runtime, threads=job.threads, read_workers=1, write_workers=1
        )
        run_stages(src, rt, grid, opts, list(parts), sink, store, parts=parts)
    finally:
        rt.close()
    return len(job.tiles)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = decode(Path(argv[0]).read_bytes())
    limit(job)
    emit({"event": "started", "pid": os.getpid(), "version": job.version})
    t0 = time.time()
    if job.corrections is not None:
        accepted, model = train(job)
        if not accepted:
            emit({"event": "done", "version": job.version, "predicted": 0})
            return 0
    else:
        model = Path(job.repository) / job.name / str(job.version) / "model.onnx"
    n = predict(job, model) if job.tiles else 0
    emit({"event": "done", "version": job.version, "predicted": n, "seconds": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
