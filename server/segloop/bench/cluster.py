"""``segloop bench dask``: the same image segmented on a LocalCluster of 1 and of 2
worker processes (one ONNX Runtime thread each), in one run; also a single process with
one thread, for the cost of going through Dask at all.

Overhead per task = worker time not spent inside a task (scheduling, transfer, idle at
the end, the client's pyramid) divided by the number of tasks, in ms.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from segloop.bench.segment import machine
from segloop.pipeline.cluster import connect
from segloop.pipeline.segment import SegmentOptions, segment
from segloop.synth import write_ome_tiff


def run_dask_bench(
    size: int = 4096,
    tile: int = 512,
    shard: int = 512,
    batch: int = 4,
    threads: int = 1,
    save: Path | None = None,
    log=print,
) -> dict[str, Any]:
    opts = SegmentOptions(tile=tile, shard=shard, batch=batch, threads=threads, overwrite=True)
    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "size": size,
        "tile": tile,
        "shard": shard,
        "threads_per_worker": threads,
    }
    with tempfile.TemporaryDirectory(prefix="segloop-bench-dask-") as tmp:
        image = Path(tmp) / "slide.ome.tif"
        write_ome_tiff(image, size, size, seed=3)
        px = size * size
        t0 = time.perf_counter()
        segment(image, Path(tmp) / "single.zarr", opts)
        result["single_process_mpx_s"] = round(px / 1e6 / (time.perf_counter() - t0), 3)
        log(f"single process, {threads} thread(s): {result['single_process_mpx_s']} Mpx/s")
        for n in (1, 2):
            client = connect(f"local:{n}")
            try:
                segment(image, Path(tmp) / "warm.zarr", opts, cluster=client)  # load models
                t0 = time.perf_counter()
                summary = segment(image, Path(tmp) / f"dask{n}.zarr", opts, cluster=client)
                wall = time.perf_counter() - t0
            finally:
                cluster = client.cluster
                client.close()
                cluster.close()
            tasks = summary["stats"]["cluster"]
            result[f"workers_{n}"] = {
                "mpx_s": round(px / 1e6 / wall, 3),
                "wall_s": round(wall, 3),
                "tasks": tasks["tasks"],
                "overhead_ms_per_task": round(
                    (wall * n - tasks["task_busy_s"]) / tasks["tasks"] * 1000, 1
                ),
            }
            log(f"{n} worker(s): {result[f'workers_{n}']}")
    result["scaling_2_vs_1"] = round(result["workers_2"]["mpx_s"] / result["workers_1"]["mpx_s"], 3)
    result["dask_1_vs_single_process"] = round(
        result["workers_1"]["mpx_s"] / result["single_process_mpx_s"], 3
    )
    if save:
        save.mkdir(parents=True, exist_ok=True)
        name = f"dask_{size}_shard{shard}_cpu{result['machine']['cores']}"
        (save / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        w1, w2 = result["workers_1"], result["workers_2"]
        (save / f"{name}.md").write_text(
            f"# Dask scaling, {size}², {result['date']}\n\n"
            f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. "
            f"Tile {tile}, shard {shard} (one task per row of shards), ONNX Runtime with "
            f"{threads} thread per worker process.\n\n"
            "| run | Mpx/s | tasks | overhead ms/task |\n|---|---|---|---|\n"
            f"| single process, {threads} thread | {result['single_process_mpx_s']} | | |\n"
            f"| LocalCluster, 1 worker | {w1['mpx_s']} | {w1['tasks']} | "
            f"{w1['overhead_ms_per_task']} |\n"
            f"| LocalCluster, 2 workers | {w2['mpx_s']} | {w2['tasks']} | "
            f"{w2['overhead_ms_per_task']} |\n\n"
            f"scaling_2_vs_1 = **{result['scaling_2_vs_1']}** (target ≥ 1.6).\n"
        )
    return result
