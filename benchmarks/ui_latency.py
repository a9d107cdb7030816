"""Review UI latency in a real browser (Debian's Chromium via Playwright) against a real
`segloop serve` on loopback.

- first tile: navigation start → the first tile loaded (``state.firstTileMs``), each load
  in a fresh browser context (empty cache), once the server has built its tile pack (a
  server that has been up a moment; a first touch is in ``segloop bench serve``); target
  < 300 ms
- stroke ack: mouse-up → the server's 200 for that stroke (``state.acks``); target
  p99 < 100 ms
- floor: the same first tile on a bare page that holds only OpenSeadragon, the image's
  size inlined (no API round trips, no page script) and its tiles from the same server:
  what this browser, machine and viewer take at the least. Loads of the bare page and of
  the review page are interleaved and both served through Playwright's request routing
  (the same overhead on each), so ``vs_floor`` compares like with like
- pan: bytes of tiles fetched while panning across the whole image at one level,
  against that level's raw size (what a viewer that loads the level whole would move)

``python benchmarks/ui_latency.py [--size 4096] [--loads 10] [--strokes 40]``
writes ``benchmarks/results/ui_latency_<size>_cpu<N>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import requests
from playwright.sync_api import sync_playwright

from segloop.bench.process import ServerProcess
from segloop.bench.segment import machine

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1280, "height": 800}
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "segloop", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return proc.stdout


def summary(values: list[float], count: str, high: int) -> dict:
    """p50, p<high>, max (ms, 0.1) and how many."""
    p = np.percentile(values, [50, high])
    return {"p50": round(float(p[0]), 1), f"p{high}": round(float(p[1]), 1),
            "max": round(max(values), 1), count: len(values)}  # fmt: skip


def wait_loaded(page) -> None:
    page.wait_for_function(
        "() => state.seg && state.seg.getFullyLoaded()"
        " && state.viewer.world.getItemAt(0).getFullyLoaded()",
        timeout=60_000,
    )


def floor_page(meta: dict, token: str) -> str:
    """A page with OpenSeadragon alone, showing the image's level pyramid as the review
    page does (tiles fetched with the token, the same viewport and options)."""
    h, w = meta["shape"]
    top = int(np.ceil(np.log2(max(h, w))))
    source = {"width": w, "height": h, "tileSize": meta["tile"], "tileOverlap": 0,
              "minLevel": top - (meta["levels"] - 1), "maxLevel": top}  # fmt: skip
    return f"""<!doctype html><html><body style="margin:0;display:flex;height:100vh">
<div id="v" style="flex:1"></div><div style="width:280px"></div>
<script src="/vendor/openseadragon/openseadragon.min.js"></script>
<script>
const source = {json.dumps(source)};
source.getTileUrl = (level, x, y) =>
  `/api/images/{meta["name"]}/tiles/image/${{{top} - level}}/${{y}}/${{x}}?v=0`;
window.firstTileMs = null;
const viewer = OpenSeadragon({{element: document.getElementById("v"), tileSources: source,
  loadTilesWithAjax: true, ajaxHeaders: {{Authorization: "Bearer {token}"}},
  showNavigator: false, showNavigationControl: false, immediateRender: false, blendTime: 0,
  imageLoaderLimit: 8, drawer: "canvas"}});
viewer.addOnceHandler("tile-loaded", () => {{ window.firstTileMs = performance.now(); }});
</script></body></html>"""


def first_tile(browser, url: str, ready: str, route=None) -> float:
    """ms from navigation start to the first tile (``ready``, a page expression), in a fresh
    context (empty caches); ``route``: a Playwright handler that serves the page."""
    ctx = browser.new_context(viewport=VIEWPORT)
    page = ctx.new_page()
    if route:
        page.route(lambda u: u == url, route)
    page.goto(url)
    page.wait_for_function(f"{ready} !== null", timeout=60_000)
    ms = page.evaluate(ready)
    ctx.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--strokes", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tmp = Path(tempfile.mkdtemp(prefix="segloop-ui-bench-"))
    slide, store = tmp / "slide.ome.tif", tmp / "slide.zarr"
    cli("synth", str(slide), "--size", str(args.size), "--quiet")
    cli("segment", str(slide), "-o", str(store), "--quiet")
    token = cli("users", "add", "bench", "--role", "reviewer", "--store", str(store))
    token = token.strip().splitlines()[-1]
    server = ServerProcess(
        [sys.executable, "-m", "segloop", "serve", str(store), "--port", "{port}"],
        env={"SEGLOOP_CACHE": str(tmp / "cache")},  # its tile pack: here
    )
    base = server.base
    while True:  # the tile pack is built in the background at start
        meta = requests.get(
            f"{base}/api/images/slide", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        if meta["tile_pack"]["tiles"] == meta["tile_pack"]["of"]:
            break
        time.sleep(0.1)
    result: dict = {"date": date.today().isoformat(), "machine": machine(), "size": args.size,
                    "tile": meta["tile"], "viewport": VIEWPORT}  # fmt: skip
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=ARGS)
            first, routed, floor = [], [], []
            review, bare, html = f"{base}/?token={token}", f"{base}/floor", floor_page(meta, token)

            def through(route) -> None:  # the server's page, passed on unchanged
                route.fulfill(response=route.fetch())

            def serve_bare(route) -> None:
                route.fulfill(body=html, content_type="text/html")

            for _ in range(args.loads):
                first.append(first_tile(browser, review, "state.firstTileMs"))
                routed.append(first_tile(browser, review, "state.firstTileMs", through))
                floor.append(first_tile(browser, bare, "firstTileMs", serve_bare))
            result["first_tile_ms"] = summary(first, "loads", 90)
            result["first_tile_routed_ms"] = summary(routed, "loads", 90)
            result["floor_first_tile_ms"] = summary(floor, "loads", 90)
            result["vs_floor"] = {
                q: round(result["first_tile_routed_ms"][q] / result["floor_first_tile_ms"][q], 2)
                for q in ("p50", "p90")
            }

            ctx = browser.new_context(viewport=VIEWPORT)
            page = ctx.new_page()
            page.goto(f"{base}/?token={token}")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")
            wait_loaded(page)
            page.get_by_test_id("tool-brush").click()
            page.get_by_test_id("size").fill("20")
            page.get_by_test_id("class").select_option("2")
            box = page.get_by_test_id("viewer").bounding_box()
            rng = np.random.default_rng(0)
            for _ in range(args.strokes):
                x = box["x"] + box["width"] * rng.uniform(0.1, 0.8)
                y = box["y"] + box["height"] * rng.uniform(0.1, 0.8)
                n = page.evaluate("state.acks.length")
                page.mouse.move(x, y)
                page.mouse.down()
                for k in range(1, 9):
                    page.mouse.move(x + 5 * k, y + 2 * k)
                page.mouse.up()
                try:
                    page.wait_for_function(f"state.acks.length > {n}", timeout=60_000)
                except Exception:
                    raise SystemExit(
                        "no ack: " + page.evaluate("document.getElementById('status').textContent")
                    ) from None
            acks = page.evaluate("state.acks")
            result["stroke_ack_ms"] = summary(acks, "strokes", 99)
            result["stroke_ack_ms"]["each"] = [round(a, 1) for a in acks]
            result["stroke_post_only_ms"] = summary(page.evaluate("state.posts"), "strokes", 99)

            # pan across the image at level 1 (one screen px = 2 image px)
            level = 1
            page.get_by_test_id("tool-pan").click()
            page.evaluate("performance.clearResourceTimings()")
            page.evaluate(
                """(level) => {
                const item = state.viewer.world.getItemAt(0);
                const vp = state.viewer.viewport;
                const zoom = item.imageToViewportZoom(1 / 2 ** level);
                vp.zoomTo(zoom, null, true);
                const w = vp.getBounds().width;
                vp.panTo(new OpenSeadragon.Point(w / 2, vp.getCenter().y), true);
            }""",
                level,
            )
            wait_loaded(page)
            steps = 0
            while page.evaluate(
                "state.viewer.viewport.getBounds().x + state.viewer.viewport.getBounds().width < 1"
            ):
                page.evaluate(
                    "state.viewer.viewport.panBy(new OpenSeadragon.Point("
                    "state.viewer.viewport.getBounds().width / 2, 0), true)"
                )
                wait_loaded(page)
                steps += 1
            fetched = page.evaluate(
                """() => performance.getEntriesByType('resource')
                .filter((e) => e.name.includes('/tiles/'))
                .reduce((s, e) => s + e.transferSize, 0)"""
            )
            bounds = page.evaluate("state.viewer.viewport.getBounds()")
            h, w = meta["level_shapes"][level]
            band = min(h, round(bounds["height"] * meta["shape"][1] / 2**level)) * w
            result["pan"] = {
                "level": level,
                "steps": steps,
                "fetched_bytes": int(fetched),
                "band_raw_bytes": int(band * 3),
                "level_raw_bytes": int(h * w * 3),
                "fetched_vs_band_raw": round(fetched / (band * 3), 3),
                "fetched_vs_level_raw": round(fetched / (h * w * 3), 3),
            }
            ctx.close()
            browser.close()
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ui_latency_{args.size}_cpu{os.cpu_count()}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    f, a, pan = result["first_tile_ms"], result["stroke_ack_ms"], result["pan"]
    r, fl, vs = result["first_tile_routed_ms"], result["floor_first_tile_ms"], result["vs_floor"]
    (args.out / f"{name}.md").write_text(
        f"# Review UI latency, {args.size}² store, {result['date']}\n\n"
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; Chromium "
        f"(Debian) headless via Playwright, server and browser on the same machine; loads "
        f"start once the server's tile pack is built.\n\n"
        "| metric | value | target |\n|---|---|---|\n"
        f"| navigation → first tile (p50 / p90, {f['loads']} cold loads) | {f['p50']} / "
        f"{f['p90']} ms | < 300 ms |\n"
        f"| the same, routed through Playwright, vs a bare OpenSeadragon page (floor) | "
        f"{r['p50']} / {r['p90']} vs {fl['p50']} / {fl['p90']} ms = "
        f"{vs['p50']} / {vs['p90']} × the floor | |\n"
        f"| mouse-up → stroke ack (p50 / p99, {a['strokes']} strokes) | {a['p50']} / "
        f"{a['p99']} ms | p99 < 100 ms |\n"
        f"| pan across the image at level {pan['level']}: tile bytes fetched | "
        f"{pan['fetched_bytes']:,} B = {pan['fetched_vs_band_raw']} × the raw band viewed, "
        f"{pan['fetched_vs_level_raw']} × the raw level | |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
