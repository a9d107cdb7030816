"""The write stage's codec pipeline, A/B: zarrs (shipped) vs zarrs on one Rust thread vs
zarr-python's own pipeline, writing the same shards the same way the write stage does.

Each round makes a fresh store (``OutputStore.create``, no image copy) for a ``--size``²
slide in 2048² shards of 512² chunks and writes every shard's labels and confidence
(uint8 each) and its two per-tile arrays in one ``OutputStore.put`` per shard, from
``--writers`` threads (the write stage's thread pool). The masks are the synthetic H&E
slide's own truth labels (``segloop.synth.render``); confidence is 255 except within 4 px
of a label boundary (64–254 there): the shape, if not the exact values, of a model's
output. Variants alternate within a round; the median of ``--rounds`` is kept. Reported
per variant and writer count: wall s, process CPU s, output Mpx/s, and the ratio to
zarr-python's pipeline.

    python benchmarks/write_pipeline.py [--size 4096] [--rounds 5] [--save benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from segloop.bench.segment import machine
from segloop.io import ome_zarr
from segloop.io.ome_zarr import OutputStore
from segloop.synth import render
from segloop.tiling import TileGrid

VARIANTS = {
    "zarrs": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"},
    "zarrs_1_thread": {
        "codec_pipeline.path": "zarrs.ZarrsCodecPipeline",
        "threading.max_workers": 1,
    },
    "zarr_python": {"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"},
}


def masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence), each (size, size) uint8, from the synthetic slide's truth."""
    _, labels = render(0, 0, size, size)
    edge = ndimage.morphological_gradient(labels, size=3) > 0
    near = ndimage.binary_dilation(edge, iterations=4)
    rng = np.random.default_rng(0)
    conf = np.full(labels.shape, 255, np.uint8)
    conf[near] = rng.integers(64, 255, int(near.sum()), dtype=np.uint8)
    return labels, conf


def write_all(store: OutputStore, labels: np.ndarray, conf: np.ndarray, writers: int) -> None:
    """Every shard of level 0 in one ``put`` each (labels, confidence, per-tile arrays)."""
    grid, per = store.grid, store.grid.shard // store.grid.tile
    tiles = np.zeros((per, per), np.float32)

    def one(sy: int, sx: int) -> None:
        box = grid.shard_box(sy, sx)
        cut = (slice(box[0], box[1]), slice(box[2], box[3]))
        store.put(
            store.shard_part("segmentation", 0, box, labels[cut]),
            store.shard_part("confidence", 0, box, conf[cut]),
            store.tiles_part("uncertainty", sy, sx, tiles),
            store.tiles_part("model_version", sy, sx, tiles.astype(np.uint16)),
        )

    with ThreadPoolExecutor(writers) as pool:  # the job's own shard order
        list(pool.map(lambda s: one(*s), grid.shard_order()))


def one_round(variant: str, size: int, writers: int, labels, conf, where: Path) -> dict:
    ome_zarr._WRITE_PIPELINE = VARIANTS[variant]  # read when the store opens its arrays
    grid = TileGrid.create(size, size, tile=512, halo=48, multiple=8, shard=2048)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = OutputStore.create(Path(tmp) / "s.zarr", grid, 3, np.uint8, copy_image=False)
        store.put(store.shard_part("segmentation", 0, (0, 512, 0, 512), labels[:512, :512]))
        t0, c0 = time.perf_counter(), time.process_time()  # ↑ opened the arrays: not timed
        write_all(store, labels, conf, writers)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--writers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--save", type=Path)
    args = p.parse_args()
    labels, conf = masks(args.size)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up (JIT, page cache): dropped
        for writers in args.writers:
            for variant in VARIANTS:
                r = one_round(variant, args.size, writers, labels, conf, args.tmp)
                runs.setdefault(f"{variant} / {writers} writer(s)", []).append(r)
    mpx = args.size**2 / 1e6
    rows = {}
    for key, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs[1:])
        cpu = statistics.median(r["cpu_s"] for r in rs[1:])
        rows[key] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "mpx_s": mpx / wall,
            "walls": [r["wall_s"] for r in rs[1:]],
        }
    for key, row in rows.items():
        base = rows[key.replace(key.split(" / ")[0], "zarr_python")]
        row["speedup_vs_zarr_python"] = base["wall_s"] / row["wall_s"]
    lines = [
        f"# write pipeline A/B, {args.size}² (labels + confidence + per-tile arrays), "
        f"median of {args.rounds}",
        "",
        "| pipeline / writer threads | wall s | CPU s | Mpx/s | vs zarr-python |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['mpx_s']:.1f} | "
            f"{r['speedup_vs_zarr_python']:.2f}× |"
            for k, r in rows.items()
        ),
    ]
    report = "\n".join(lines)
    print(report)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        name = f"write_pipeline_{args.size}_cpu{machine()['cores']}"
        (args.save / f"{name}.json").write_text(
            json.dumps(
                {"machine": machine(), "size": args.size, "rounds": args.rounds, "rows": rows},
                indent=2,
            )
        )
        (args.save / f"{name}.md").write_text(report + f"\n\nmachine: {machine()}\n")
        print(f"saved {args.save / name}.{{json,md}}", file=sys.stderr)


if __name__ == "__main__":
    main()
