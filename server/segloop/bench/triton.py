"""``segloop bench triton``: the same image segmented through the Triton ensemble and
with the embedded runtime, side by side in one run (rounds alternate, best kept).

Also the per-request overhead: one batch of windows through the ensemble (client and
server on this machine) minus the same pre + network + post in-process, in ms.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segloop.bench.segment import cpu_busy_s, machine
from segloop.kernels.post import labels_confidence
from segloop.kernels.pre import normalise_into
from segloop.pipeline.segment import SegmentOptions, default_model, normalisation_for, segment
from segloop.runtimes import create_runtime
from segloop.synth import write_ome_tiff
from segloop.tiling import TileGrid
from segloop.triton.server import ServerOptions, TritonServer, free_port


def _request_overhead_ms(
    image: Path, url: str, tile: int, batch: int, threads: int, shm: str, n: int = 10
) -> dict[str, float]:
    """Median ms for one batch: ensemble call vs in-process pre + run + post."""
    from segloop.io.formats import open_image

    src = open_image(image)
    local = create_runtime("onnx", default_model(), threads)
    remote = create_runtime("triton", default_model(), threads, url=url, shm=shm)
    grid = TileGrid.create(
        src.height, src.width, tile, local.card["halo"], local.card["input"]["multiple_of"]
    )
    tiles = grid.tiles(0, 0)[:batch]
    boxes = [grid.window_indices(grid.tile_window(t)) for t in tiles]
    side = grid.tile + 2 * grid.halo
    windows = np.stack(
        [src.read(r0, r1, c0, c1)[np.ix_(rows, cols)] for r0, r1, c0, c1, rows, cols in boxes]
    )
    norm = normalisation_for(local.card, src)
    index = np.arange(side, dtype=np.intp)

    def embedded() -> None:
        arr = np.empty((len(windows), 3, side, side), np.float32)
        for i, w in enumerate(windows):
            normalise_into(w, index, index, norm, arr[i])
        labels_confidence(local.run(arr), grid.halo, grid.tile)

    def triton() -> None:
        remote.submit(windows).result()

    times: dict[str, list[float]] = {"embedded": [], "triton": []}
    try:
        for fn in (embedded, triton):  # warm-up
            fn()
        for _ in range(n):
            for name, fn in (("embedded", embedded), ("triton", triton)):
                t0 = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t0))
    finally:
        remote.close()
        local.close()
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "embedded_ms": round(med["embedded"], 1),
        "triton_ms": round(med["triton"], 1),
        "overhead_ms": round(med["triton"] - med["embedded"], 1),
    }


def run_triton_bench(
    size: int,
    tile: int = 512,
    batch: int = 4,
    threads: int = 2,
    rounds: int = 2,
    shm: str = "auto",
    save: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    ports = free_port(), free_port(), free_port()
    opts = ServerOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    url = f"localhost:{ports[1]}"
    with tempfile.TemporaryDirectory(prefix="segloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        image = tmp / "bench.ome.tif"
        log(f"generating {size}² image …")
        write_ome_tiff(image, size, size, seed=11)
        log("starting tritonserver …")
        with TritonServer(opts, log=tmp / "tritonserver.log"):
            embedded = SegmentOptions(tile=tile, batch=batch, threads=threads, overwrite=True)
            remote = SegmentOptions(
                tile=tile,
                batch=batch,
                threads=threads,
                overwrite=True,
                runtime="triton",
                runtime_options={"url": url, "shm": shm},
            )
            for o in (embedded, remote):  # warm-up: JIT caches, page cache, server sessions
                segment(image, tmp / "warm.zarr", o)
            times: dict[str, list[float]] = {"embedded": [], "triton": []}
            busy0 = cpu_busy_s()
            for r in range(rounds):
                for name, o in (("embedded", embedded), ("triton", remote)):
                    log(f"round {r + 1}/{rounds}: {name} …")
                    t0 = time.perf_counter()
                    segment(image, tmp / f"{name}.zarr", o)
                    times[name].append(time.perf_counter() - t0)
            busy1 = cpu_busy_s()
            log("per-request overhead …")
            overhead = _request_overhead_ms(image, url, tile, batch, threads, shm)
    px = size * size
    emb, tri = (px / 1e6 / min(times[k]) for k in ("embedded", "triton"))
    result: dict[str, Any] = {
        "benchmark": "triton",
        "size": size,
        "tile": tile,
        "batch": batch,
        "threads": threads,
        "shm": shm,
        "rounds": rounds,
        "triton_mpx_s": round(tri, 3),
        "embedded_mpx_s": round(emb, 3),
        "triton_vs_embedded": round(tri / emb, 3),
        "request": overhead,
        "all_times_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "cpu_busy_s": round(busy1 - busy0, 1),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "server": "tritonserver 2.51 (nvidia-pytriton), python backend, same host",
    }
    if save:
        save.mkdir(parents=True, exist_ok=True)
        name = f"triton_{size}_cpu{result['machine']['cores']}"
        (save / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
