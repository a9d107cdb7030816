"""``segloop bench serve``: review-server latency on loopback, bounded load.

A fresh store (synthetic slide segmented with ``tile``) is served by a real ``segloop
serve`` process. ``clients`` concurrent aiohttp clients fetch every tile of every layer and
level once (cold: a fresh server, each a zarr read + encode), then all again with no
browser cache (server-cached: the server's encoded-tile cache answers), then all again
with ``If-None-Match`` (304s); then one client sends 200-point strokes of radius 40 (edit
round trip: validation, rasterising, SQLite commit with fsync; the shards are rewritten
behind the answer), then the largest polygon and stroke the per-edit budget allows
(``review/worst.py``) while another asks ``/api/health`` back to back. Where ``wrk`` is on
PATH, the cached and 304 passes are also driven by it (a C client on one thread, cycling
through the same URLs for 5 s): the aiohttp client costs the shared cores about as much as
the server does, so wrk shows the server's own latency.
Client and server share the machine's cores, so the numbers include the client's cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from segloop.assets import shipped
from segloop.bench.process import ServerProcess
from segloop.bench.segment import cpu_busy_s, machine
from segloop.errors import UserError
from segloop.pipeline.segment import SegmentOptions, segment
from segloop.review.db import ReviewDB
from segloop.synth import write_ome_tiff


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "n": len(values),
    }


def _summary(lat: list[float], seconds: float) -> dict[str, float]:
    return {**percentiles(lat), "tiles_s": round(len(lat) / seconds, 1)}


async def fetch_all(
    base: str, headers: dict[str, str], urls: list[str], clients: int, etags: dict | None
) -> tuple[list[float], dict[str, str], float]:
    """Every URL once, ``clients`` at a time: (latencies s, ETags, wall s)."""
    import aiohttp

    queue: asyncio.Queue[str] = asyncio.Queue()
    for u in urls:
        queue.put_nowait(u)
    lat: list[float] = []
    seen: dict[str, str] = {}

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
                seen[u] = r.headers.get("ETag", "")
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return lat, seen, time.perf_counter() - t0


async def edit_round_trips(
    base: str,
    token: str,
    shape: tuple[int, int],
    n: int,
    image: str = "bench",
    box: tuple[int, int, int, int] | None = None,
) -> list[float]:
    """Seconds of ``n`` edit round trips: 200-point strokes of radius 40, 300 × 150 px,
    starting at random points of ``box`` (y0, y1, x0, x1; default: the whole image)."""
    import aiohttp

    rng = random.Random(0)
    lat = []
    y_lo, y_hi, x_lo, x_hi = box or (200, shape[0] - 200, 50, shape[1] - 400)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        for _ in range(n):
            x0, y0 = rng.randrange(x_lo, x_hi), rng.randrange(y_lo, y_hi)
            pts = [
                [x0 + int(300 * t), y0 + int(150 * np.sin(6 * t))] for t in np.linspace(0, 1, 200)
            ]
            body = {"op": "brush", "points": pts, "label": rng.randrange(3), "radius": 40}
            t0 = time.perf_counter()
            async with s.post(f"{base}/api/images/{image}/edits", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"edit: HTTP {r.status}")
            lat.append(time.perf_counter() - t0)
    return lat


async def _worst_edits(
    base: str, token: str, shape: tuple[int, int], tile: int, rounds: int
) -> dict[str, Any]:
    """The largest allowed polygon and stroke (``review/worst.py``), ``rounds`` of each in
    turn from one client, while another asks ``/api/health`` back to back: each edit's
    latency, and the health latencies of the requests sent while an edit was in flight."""
    import aiohttp

    from segloop.review.worst import rows_swept, worst_polygon, worst_stroke

    bodies = {"polygon": worst_polygon(shape, tile), "stroke": worst_stroke(shape, tile)}
    lat: dict[str, list[float]] = {name: [] for name in bodies}
    during: list[float] = []
    busy = asyncio.Event()
    stop = asyncio.Event()

    async def ping(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            await busy.wait()
            t0 = time.perf_counter()  # sent while an edit is in flight: counted
            async with s.get(base + "/api/health") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"health: HTTP {r.status}")
            if not stop.is_set():
                during.append(time.perf_counter() - t0)

    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as pinger, aiohttp.ClientSession(headers=auth) as s:
        task = asyncio.create_task(ping(pinger))
        for _ in range(rounds):
            for name, body in bodies.items():
                busy.set()
                t0 = time.perf_counter()
                async with s.post(base + "/api/images/bench/edits", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"worst {name}: HTTP {r.status} {await r.text()}")
                lat[name].append(time.perf_counter() - t0)
                busy.clear()
                body["label"] = 3 - body["label"]  # 1 ↔ 2: the next one changes pixels
        stop.set()
        busy.set()
        await task
    return {
        **{
            name: {
                **percentiles(lat[name]),
                "points": len(body["points"]),
                "rows_swept": rows_swept(body),
                **({"radius": body["radius"]} if "radius" in body else {}),
            }
            for name, body in bodies.items()
        },
        "health_during": percentiles(during) if during else None,
    }


_WRK_SCRIPT = """
-- every request of the list file (one "path<TAB>header: value<TAB>…" line each), in turn
local reqs, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do
    local fields, h = {}, {}
    for f in line:gmatch("[^\t]+") do fields[#fields + 1] = f end
    for k = 2, #fields do
      local name, value = fields[k]:match("^([^:]+): (.*)$")
      h[name] = value
    end
    reqs[#reqs + 1] = wrk.format("GET", fields[1], h)
  end
end
request = function() i = i % #reqs + 1; return reqs[i] end
"""


def _wrk(
    base: str, headers: dict, urls: list[str], etags: dict | None, clients: int, tmp: Path,
    seconds: int = 5,
) -> dict[str, float]:  # fmt: skip
    """wrk cycling through ``urls`` (``If-None-Match`` from ``etags``) for ``seconds`` with
    ``clients`` connections on one thread: p50/p99 ms and requests/s as wrk reports them."""
    lines = []
    for u in urls:
        h = {**headers, **({"If-None-Match": etags[u]} if etags else {})}
        lines.append("\t".join([u, *(f"{k}: {v}" for k, v in h.items())]))
    (tmp / "wrk-urls.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "wrk.lua").write_text(_WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(tmp / "wrk.lua"),
         base, "--", str(tmp / "wrk-urls.tsv")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")

    def ms(pct: str) -> float:
        value = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)$", out, re.M)
        if value is None:
            raise RuntimeError(f"no {pct}% line in wrk's output:\n{out}")
        return round(float(value[1]) * {"us": 1e-3, "ms": 1, "s": 1e3}[value[2]], 2)

    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    return {
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "requests_s": float(rate[1]),
        "seconds": seconds,
    }


def _vs_large_image(
    python: str, image: Path, serve_cmd: list[str], token: str, meta: dict, clients: int,
    rounds: int, log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """The image layer through segloop (tile pack built; and without one) and through
    large_image, A/B/C, fresh servers."""
    script = shipped("benchmarks") / "large_image_server.py"
    if not script.is_file():
        raise UserError(f"--vs-large-image needs a source checkout ({script} is missing)")
    tile, levels = meta["tile"], meta["levels"]
    tiles = [
        (k, ty, tx)
        for k, (h, w) in enumerate(meta["level_shapes"])
        for ty in range(-(-h // tile))
        for tx in range(-(-w // tile))
    ]
    random.Random(2).shuffle(tiles)
    ours = [f"/api/images/bench/tiles/image/{k}/{ty}/{tx}" for k, ty, tx in tiles]
    theirs = [f"/tiles/{levels - 1 - k}/{tx}/{ty}" for k, ty, tx in tiles]
    auth = {"Authorization": f"Bearer {token}", "Accept": "image/jpeg"}
    best: dict[str, dict[str, dict]] = {"segloop": {}, "segloop_no_pack": {}, "large_image": {}}
    busy0, own0 = cpu_busy_s(), sum(psutil.Process().cpu_times()[:4])  # children too
    for r in range(rounds):
        for name, cmd, health, urls, headers in (
            ("segloop", serve_cmd, "/api/health", ours, auth),
            ("segloop_no_pack", [*serve_cmd, "--no-tile-pack"], "/api/health", ours, auth),
            ("large_image", [python, str(script), str(image), "{port}"], "/health", theirs, {}),
        ):
            log(f"round {r + 1}/{rounds}: {name}, {len(urls)} image tiles, cold then again …")
            with ServerProcess(cmd, health) as srv:
                base = srv.base
                for phase in ("cold", "again"):
                    lat, _, sec = asyncio.run(fetch_all(base, headers, urls, clients, None))
                    result = _summary(lat, sec)
                    kept = best[name].get(phase)
                    if kept is None or result["tiles_s"] > kept["tiles_s"]:
                        best[name][phase] = result
    other = (cpu_busy_s() - busy0) - (sum(psutil.Process().cpu_times()[:4]) - own0)

    def ratio(name: str, phase: str) -> float:
        return round(best[name][phase]["tiles_s"] / best["large_image"][phase]["tiles_s"], 2)

    return {
        **best,
        "ratio_cold": ratio("segloop", "cold"),
        "ratio_cold_no_pack": ratio("segloop_no_pack", "cold"),
        "ratio_again": ratio("segloop", "again"),
        "rounds": rounds,
        "format": "JPEG from both (segloop asked with Accept: image/jpeg)",
        "foreign_cpu_s": round(max(0, other), 1),  # other processes, during it
    }  # fmt: skip


def run_serve_bench(
    size: int = 4096,
    tile: int = 512,
    batch: int = 4,
    threads: int = 2,
    clients: int = 32,
    edits: int = 50,
    large_image: str | None = None,
    rounds: int = 2,
    worst_rounds: int = 3,
    save: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import requests

    with tempfile.TemporaryDirectory(prefix="segloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        # the servers' tile packs (review/tile_pack.py) go with the rest, not into ~/.cache
        os.environ["SEGLOOP_CACHE"] = str(tmp / "cache")
        image, store = tmp / "bench.ome.tif", tmp / "bench.zarr"
        log(f"generating and segmenting a {size}² slide …")
        write_ome_tiff(image, size, size, seed=11, tile=tile)
        segment(image, store, SegmentOptions(tile=tile, batch=batch, threads=threads))
        db = ReviewDB(store)
        token = db.add_user("bench", "reviewer")
        db.close()
        serve_cmd = [sys.executable, "-m", "segloop", "serve", str(store), "--port", "{port}"]
        headers = {"Authorization": f"Bearer {token}", "Accept": "image/webp,*/*"}
        with ServerProcess([*serve_cmd, "--no-tile-pack"], "/api/health") as srv:
            base = srv.base
            meta = requests.get(base + "/api/images/bench", timeout=10, headers=headers).json()
            urls = [
                f"/api/images/bench/tiles/{layer}/{k}/{ty}/{tx}"
                for layer in ("image", "segmentation", "confidence")
                for k, (h, w) in enumerate(meta["level_shapes"])
                for ty in range(-(-h // tile))
                for tx in range(-(-w // tile))
            ]
            random.Random(1).shuffle(urls)
            log(f"{len(urls)} tiles, first touch (no tile pack), {clients} clients …")
            first, _, first_s = asyncio.run(fetch_all(base, headers, urls, clients, None))
        with ServerProcess(serve_cmd, "/api/health") as srv:
            base = srv.base
            t0 = time.perf_counter()
            while True:  # the server encodes the image tiles in the background
                pack = requests.get(base + "/api/images/bench", headers=headers).json()
                if pack["tile_pack"]["tiles"] == pack["tile_pack"]["of"]:
                    break
                time.sleep(0.05)
            pack_s = time.perf_counter() - t0
        log(f"tile pack built in {pack_s:.1f} s; a fresh server: cold, cached, 304 …")
        with ServerProcess(serve_cmd, "/api/health") as srv:
            base = srv.base
            cold, etags, cold_s = asyncio.run(fetch_all(base, headers, urls, clients, None))
            cached, _, cached_s = asyncio.run(fetch_all(base, headers, urls, clients, None))
            hit, _, hit_s = asyncio.run(fetch_all(base, headers, urls, clients, etags))
            by_wrk = None
            if shutil.which("wrk"):
                log("the same tiles from wrk (a C client: the server's own latency) …")
                by_wrk = {
                    "server_cached_tiles": _wrk(base, headers, urls, None, clients, tmp),
                    "not_modified": _wrk(base, headers, urls, etags, clients, tmp),
                }
            log(f"{edits} edits (200 points, radius 40) …")
            edit_lat = asyncio.run(edit_round_trips(base, token, tuple(meta["shape"]), edits))
            log(f"the largest allowed polygon and stroke, {worst_rounds} each, health meanwhile …")
            worst = asyncio.run(_worst_edits(base, token, tuple(meta["shape"]), tile, worst_rounds))
        versus = None
        if large_image:
            versus = _vs_large_image(
                large_image, image, serve_cmd, token, meta, clients, rounds, log
            )
    result: dict[str, Any] = {
        "benchmark": "serve",
        "size": size,
        "tile": tile,
        "clients": clients,
        "first_touch_tiles": _summary(first, first_s),
        "tile_pack_build_s": round(pack_s, 2),
        "cold_tiles": _summary(cold, cold_s),
        "server_cached_tiles": _summary(cached, cached_s),
        "not_modified": _summary(hit, hit_s),
        "edit_round_trip": percentiles(edit_lat),
        "worst_case_edit": worst,
        "wrk": by_wrk,
        "vs_large_image": versus,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "note": "client and server on the same cores"
        + ("" if versus else "; large_image not compared (give --vs-large-image PYTHON)"),
    }
    if save:
        save.mkdir(parents=True, exist_ok=True)
        stem = save / f"serve_{size}_cpu{result['machine']['cores']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    rows = [
        ("tiles, first touch (fresh server, no tile pack)", r["first_touch_tiles"], "p99 < 25"),
        ("tiles, cold (fresh server, tile pack built)", r["cold_tiles"], "p99 < 25"),
        ("tiles, again (server's memory cache)", r["server_cached_tiles"], ""),
        ("304 Not Modified", r["not_modified"], "p99 < 5"),
        ("edit, 200-point stroke radius 40", r["edit_round_trip"], "p99 < 50"),
    ]
    out = [
        f"# Review server, {r['size']}² store, tile {r['tile']}, {r['clients']} clients, "
        f"{r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; client and server on the same cores "
        "(aiohttp clients; wrk rows: wrk, one thread, cycling through the same tiles for "
        "5 s). "
        f"Tile pack built in {r['tile_pack_build_s']} s.",
        "",
        "| what | p50 ms | p99 ms | tiles/s | target (ms) |",
        "|---|---|---|---|---|",
    ]
    if r.get("wrk"):
        rows[3:3] = [
            ("tiles, again, from wrk", r["wrk"]["server_cached_tiles"], ""),
            ("304 Not Modified, from wrk", r["wrk"]["not_modified"], "p99 < 5"),
        ]
    for name, v, target in rows:
        rate = v.get("tiles_s", v.get("requests_s", ""))
        out.append(f"| {name} | {v['p50_ms']} | {v['p99_ms']} | {rate} | {target} |")
    worst = r.get("worst_case_edit")
    if worst:
        health = worst["health_during"]
        out += [
            "",
            "Worst-case edits (the largest the per-edit budget allows, `review/worst.py`), "
            "one client, while another asks `/api/health` back to back:",
            "",
            "| edit | points | rows swept | p50 ms | p99 ms | n |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("polygon", "stroke"):
            v = worst[name]
            out.append(
                f"| {name} | {v['points']} | {v['rows_swept']} | {v['p50_ms']} | "
                f"{v['p99_ms']} | {v['n']} |"
            )
        if health:
            out += [
                "",
                f"`/api/health` meanwhile: p50 {health['p50_ms']} ms, p99 {health['p99_ms']} "
                f"ms ({health['n']} requests; target p99 < 100).",
            ]
    vs = r.get("vs_large_image")
    if vs:
        out += [
            "",
            f"Image layer side by side with large_image ({vs['format']}; best of "
            f"{vs['rounds']} A/B rounds, fresh servers; other processes used "
            f"{vs['foreign_cpu_s']} s of CPU meanwhile):",
            "",
            "| server | cold tiles/s | cold p99 ms | again tiles/s |",
            "|---|---|---|---|",
        ]
        for name in ("segloop", "segloop_no_pack", "large_image"):
            c, a = vs[name]["cold"], vs[name]["again"]
            out.append(f"| {name} | {c['tiles_s']} | {c['p99_ms']} | {a['tiles_s']} |")
        out += [
            "",
            f"Ratio vs large_image, cold: **{vs['ratio_cold']}×** with the tile pack, "
            f"{vs['ratio_cold_no_pack']}× without; again: {vs['ratio_again']}×.",
        ]
    return "\n".join(out) + "\n"
