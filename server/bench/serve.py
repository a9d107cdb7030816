"""``segloop bench serve``: review-server latency on loopback, bounded load.

A fresh store (synthetic slide segmented with ``tile``) is served by a real ``segloop
serve`` process. ``clients`` concurrent aiohttp clients fetch every tile of every layer and
level once (cold: a fresh server, each a zarr read + encode), then all again with no
browser cache (server-cached: the server's encoded-tile cache answers), then all again
with ``If-None-Match`` (304s); then one client sends 200-point strokes of radius 40 (edit
round trip: validation, rasterising, SQLite commit with fsync; the shards are rewritten
behind the answer).
Client and server share the machine's cores, so the numbers include the client's cost.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segloop.bench.segment import machine
from segloop.pipeline.segment import SegmentOptions, segment
from segloop.review.db import ReviewDB
from segloop.synth import write_ome_tiff
from segloop.triton.server import free_port


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "n": len(values),
    }


async def _load(
    base: str, token: str, urls: list[str], clients: int, etags: dict[str, str] | None
) -> tuple[list[float], dict[str, str], float]:
    import aiohttp

    queue: asyncio.Queue[str] = asyncio.Queue()
    for u in urls:
        queue.put_nowait(u)
    lat: list[float] = []
    seen: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {token}", "Accept": "image/webp,*/*"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            u = queue.get_nowait()
            h = dict(headers)
            if etags is not None:
                h["If-None-Match"] = etags[u]
            t0 = time.perf_counter()
            async with session.get(base + u, headers=h) as r:
                await r.read()
                expected = 304 if etags is not None else 200
                if r.status != expected:
                    raise RuntimeError(f"{u}: HTTP {r.status}, expected {expected}")
                seen[u] = r.headers["ETag"]
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return lat, seen, time.perf_counter() - t0


async def _edits(base: str, token: str, shape: tuple[int, int], n: int) -> list[float]:
    import aiohttp

    rng = random.Random(0)
    lat = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        for _ in range(n):
            x0, y0 = rng.randrange(50, shape[1] - 400), rng.randrange(200, shape[0] - 200)
            pts = [
                [x0 + int(300 * t), y0 + int(150 * np.sin(6 * t))] for t in np.linspace(0, 1, 200)
            ]
            body = {"op": "brush", "points": pts, "label": rng.randrange(3), "radius": 40}
            t0 = time.perf_counter()
            async with s.post(base + "/api/images/bench/edits", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"edit: HTTP {r.status}")
            lat.append(time.perf_counter() - t0)
    return lat


def run_serve_bench(
    size: int = 4096,
    tile: int = 256,
    batch: int = 4,
    threads: int = 2,
    clients: int = 32,
    edits: int = 50,
    save: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import requests

    with tempfile.TemporaryDirectory(prefix="segloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        image, store = tmp / "bench.ome.tif", tmp / "bench.zarr"
        log(f"generating and segmenting a {size}² slide …")
        write_ome_tiff(image, size, size, seed=11)
        segment(image, store, SegmentOptions(tile=tile, batch=batch, threads=threads))
        db = ReviewDB(store)
        token = db.add_user("bench", "reviewer")
        db.close()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "segloop", "serve", str(store), "--port", str(port)],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(base + "/api/health", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
                if time.monotonic() > deadline:
                    raise RuntimeError("segloop serve did not start")
            meta = requests.get(
                base + "/api/images/bench", timeout=10, headers={"Authorization": f"Bearer {token}"}
            ).json()
            urls = [
                f"/api/images/bench/tiles/{layer}/{k}/{ty}/{tx}"
                for layer in ("image", "segmentation", "confidence")
                for k, (h, w) in enumerate(meta["level_shapes"])
                for ty in range(-(-h // tile))
                for tx in range(-(-w // tile))
            ]
            random.Random(1).shuffle(urls)
            log(f"{len(urls)} cold tiles, {clients} clients …")
            cold, etags, cold_s = asyncio.run(_load(base, token, urls, clients, None))
            log("the same tiles again, no browser cache (server's tile cache) …")
            cached, _, cached_s = asyncio.run(_load(base, token, urls, clients, None))
            log("the same tiles with If-None-Match …")
            hit, _, hit_s = asyncio.run(_load(base, token, urls, clients, etags))
            log(f"{edits} edits (200 points, radius 40) …")
            edit_lat = asyncio.run(_edits(base, token, tuple(meta["shape"]), edits))
        finally:
            server.terminate()
            server.wait(30)
    result: dict[str, Any] = {
        "benchmark": "serve",
        "size": size,
        "tile": tile,
        "clients": clients,
        "cold_tiles": {**_pct(cold), "tiles_s": round(len(cold) / cold_s, 1)},
        "server_cached_tiles": {**_pct(cached), "tiles_s": round(len(cached) / cached_s, 1)},
        "not_modified": {**_pct(hit), "tiles_s": round(len(hit) / hit_s, 1)},
        "edit_round_trip": _pct(edit_lat),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "note": "client and server on the same cores; large-image not compared (own venv "
        "needed, not set up)",
    }
    if save:
        save.mkdir(parents=True, exist_ok=True)
        (save / f"serve_{size}_cpu{result['machine']['cores']}.json").write_text(
            json.dumps(result, indent=2) + "\n"
        )
    return result
