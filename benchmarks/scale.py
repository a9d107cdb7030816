"""A 100k × 80k slide end to end, run (not extrapolated): make, segment, serve.

0. First, untimed: a 2048² job and a server start with numba's cache in a fresh folder,
   so every kernel is compiled once there (as on the first run after an install; that
   cost is reported) and every timed run finds it cached.
1. Makes a pyramidal JPEG BigTIFF cheaply: one 512² H&E tile from ``segloop synth``,
   JPEG-encoded once per level and written as pre-compressed tiles (tifffile), levels
   until the image fits a tile. The same for a 10k² reference and a 40k × 10k strip of
   its width (the 10k² job ends before the pipeline's queues fill; the strip does not).
2. Segments all three through the CLI with the zero-cost model
   (``segloop.bench.zero_model``: the host pipeline's ceiling) in fresh processes: wall
   time, Mpx/s, peak RSS and RSS sampled each second, store size.
3. Serves the big store (``segloop serve``): first-tile latency of image, labels and
   confidence tiles at level 0 and at the top, and the tile pack's progress in a window.
4. The shipped model on a band of the big slide's full width (``--model-band`` rows,
   default one shard row, 2048; made the same way): wall time, Mpx/s, peak RSS, stages
   (the whole slide would take hours on 2 cores).

    python benchmarks/scale.py [--height 80000 --width 100000] [--model-band 2048]
                               [--save benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import psutil
import requests
import tifffile

from segloop.bench.process import ServerProcess
from segloop.bench.segment import machine, store_bytes
from segloop.bench.zero_model import identity_model
from segloop.pipeline.segment import default_model
from segloop.review.db import ReviewDB
from segloop.synth import SYNTH_MPP, write_ome_tiff

TILE = 512


def make_slide(path: Path, height: int, width: int, tmp: Path) -> None:
    """Pyramidal JPEG BigTIFF of one repeated tile (level k: the tile downsampled k times)."""
    seed = tmp / "seed.ome.tif"
    if not seed.exists():
        write_ome_tiff(seed, 4 * TILE, 4 * TILE, seed=7)
    block = tifffile.imread(seed)[TILE : 2 * TILE, TILE : 2 * TILE]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        h, w, level, img = height, width, 0, block
        levels = 1
        while max(-(-height >> levels), -(-width >> levels)) > TILE:
            levels += 1
        while level < levels:
            data = imagecodecs.jpeg_encode(img, level=90)
            n = -(-h // TILE) * -(-w // TILE)
            opts = dict(tile=(TILE, TILE), compression="jpeg", photometric="rgb")
            if level == 0:
                opts["subifds"] = levels - 1
            else:
                opts["subfiletype"] = 1
            tw.write(iter([data] * n), shape=(h, w, 3), dtype=np.uint8, **opts)
            img = np.ascontiguousarray(img[::2, ::2].repeat(2, 0).repeat(2, 1))
            h, w, level = -(-h // 2), -(-w // 2), level + 1


def segment(image: Path, out: Path, model: Path, every_s: float = 1.0) -> tuple[dict, list]:
    """The CLI's ``--json`` record of one run, and its RSS sampled every ``every_s`` seconds
    as ``[[s since start, MB], …]`` (where memory grows: with time, or at once)."""
    cmd = [sys.executable, "-m", "segloop", "segment", str(image), "-o", str(out)]
    args = [*cmd, "--model", str(model), "--mpp", str(SYNTH_MPP), "--json", "--overwrite"]
    # the tiles come from `segloop synth`: its µm/px (the TIFF made here states none)
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(args, stdout=so, stderr=se, text=True)
        child, t0, timeline = psutil.Process(proc.pid), time.perf_counter(), []
        while proc.poll() is None:
            try:
                mb = child.memory_info().rss / 2**20
            except psutil.NoSuchProcess:  # it ended between poll() and here
                break
            timeline.append([round(time.perf_counter() - t0, 1), round(mb)])
            time.sleep(every_s)
        proc.wait()
        so.seek(0), se.seek(0)
        if proc.returncode:
            raise RuntimeError(se.read()[-2000:])
        return json.loads(so.read().splitlines()[-1]), timeline


def run_summary(height: int, width: int, record: dict, timeline: list) -> dict:
    """What a run reports of one ``segment`` record and its RSS timeline."""
    s = record["stats"]
    return {
        "height": height,
        "width": width,
        "wall_s": s["wall_s"],
        "mpx_s": s["mpx_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        "stages": s["stages"],
        "rss_timeline_s_mb": timeline,
    }


def serve(store: Path, pack_window_s: float) -> dict:
    db = ReviewDB(store)
    token = db.add_user("scale", "reviewer")
    db.close()
    headers = {"Authorization": f"Bearer {token}", "Accept": "image/webp,*/*"}
    cmd = [sys.executable, "-m", "segloop", "serve", str(store), "--port", "{port}"]
    out: dict = {}
    t_start = time.perf_counter()
    with ServerProcess(cmd) as srv:
        base = srv.base
        out["server_ready_s"] = round(time.perf_counter() - t_start, 2)
        name = requests.get(base + "/api/images", headers=headers, timeout=30).json()
        name = name[0]["name"] if isinstance(name, list) else next(iter(name))
        meta = requests.get(f"{base}/api/images/{name}", headers=headers, timeout=30).json()
        top = len(meta["level_shapes"]) - 1
        h0, w0 = meta["level_shapes"][0]
        middle = (h0 // TILE // 2, w0 // TILE // 2)
        first: dict[str, float] = {}
        for layer in ("image", "segmentation", "confidence"):
            for level, (ty, tx) in ((0, middle), (top, (0, 0))):
                url = f"{base}/api/images/{name}/tiles/{layer}/{level}/{ty}/{tx}"
                t0 = time.perf_counter()
                r = requests.get(url, headers=headers, timeout=60)
                r.raise_for_status()
                first[f"{layer}/{level}"] = round((time.perf_counter() - t0) * 1000, 1)
        out["first_tile_ms"] = first
        t0 = time.perf_counter()
        pack0 = requests.get(f"{base}/api/images/{name}", headers=headers).json()["tile_pack"]
        if pack0 is None:
            return out
        while time.perf_counter() - t0 < pack_window_s:
            pack = requests.get(f"{base}/api/images/{name}", headers=headers).json()
            if pack["tile_pack"]["tiles"] >= pack["tile_pack"]["of"]:
                break
            time.sleep(1)
        pack = pack["tile_pack"]
        dt = time.perf_counter() - t0
        out["tile_pack"] = {
            "tiles_done": pack["tiles"],
            "of": pack["of"],
            "window_s": round(dt, 1),
            "tiles_per_s": round((pack["tiles"] - pack0["tiles"]) / dt, 1),
        }
    return out


def warm_up(tmp: Path, model: Path, pack_window_s: float) -> dict:
    """One untimed 2048² job and server start: numba compiles its kernels (and caches
    them) on a first run, which made the first timed job ~9 s slower and ~130 MB larger,
    and the first server start ~9 s slower, here. Returns those first-run costs."""
    image, store = tmp / "warmup.tif", tmp / "warmup.zarr"
    make_slide(image, 2048, 2048, tmp)
    t0 = time.perf_counter()
    record, _ = segment(image, store, model)
    job_s = time.perf_counter() - t0
    ready = serve(store, min(pack_window_s, 5.0))["server_ready_s"]
    peak = record["stats"]["peak_rss_mb"]
    return {"job_s": round(job_s, 2), "peak_rss_mb": peak, "server_ready_s": ready}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--height", type=int, default=80_000)
    p.add_argument("--width", type=int, default=100_000)
    p.add_argument("--reference", type=int, default=10_000)
    p.add_argument("--pack-window", type=float, default=60.0)
    p.add_argument("--model-band", type=int, default=2048, help="shipped-model rows; 0: none")
    p.add_argument("--save", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="segloop-scale-", dir=os.environ.get("TMPDIR")) as d:
        tmp = Path(d)
        os.environ["SEGLOOP_CACHE"] = str(tmp / "cache")
        os.environ["NUMBA_CACHE_DIR"] = str(tmp / "numba")  # compiled by warm_up, then kept
        zero = identity_model(default_model(), tmp / "zero.onnx")
        result: dict = {"benchmark": "scale", "machine": machine(), "runs": {}}
        result["warmup"] = warm_up(tmp, zero, a.pack_window)
        # the 10k² job ends before its queues fill (≈ 3 s); the strip of the same width and
        # 4× the height runs long enough to reach the pipeline's steady memory
        strip = (4 * a.reference, a.reference)
        for h, w in ((a.reference, a.reference), strip, (a.height, a.width)):
            image, store = tmp / f"s{h}x{w}.tif", tmp / f"s{h}x{w}.zarr"
            t0 = time.perf_counter()
            make_slide(image, h, w, tmp)
            made = time.perf_counter() - t0
            print(f"{h}×{w}: made in {made:.0f} s, segmenting …", file=sys.stderr)
            run = run_summary(h, w, *segment(image, store, zero))
            run["make_s"] = round(made, 1)
            run["source_bytes"] = image.stat().st_size
            run["store_bytes"] = store_bytes(store)
            run["store_bytes_per_source_byte"] = round(run["store_bytes"] / run["source_bytes"], 3)
            if (h, w) == (a.height, a.width):
                print("serving …", file=sys.stderr)
                run["serve"] = serve(store, a.pack_window)
            result["runs"][f"{h}x{w}"] = run
            print(
                json.dumps({k: v for k, v in run.items() if k != "rss_timeline_s_mb"}),
                file=sys.stderr,
            )
        if a.model_band:
            h, w = a.model_band, a.width
            image, store = tmp / f"band{h}x{w}.tif", tmp / f"band{h}x{w}.zarr"
            make_slide(image, h, w, tmp)
            print(f"{h}×{w}: the shipped model …", file=sys.stderr)
            band = segment(image, store, default_model())
            result["shipped_model_band"] = run_summary(h, w, *band)
        ref, tall, big = (result["runs"][k] for k in result["runs"])
        result["peak_rss_ratio_big_vs_reference"] = round(
            big["peak_rss_mb"] / ref["peak_rss_mb"], 3
        )
        result["peak_rss_ratio_big_vs_strip"] = round(big["peak_rss_mb"] / tall["peak_rss_mb"], 3)
        result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
        name = f"scale_{a.width}x{a.height}_cpu{result['machine']['cores']}"
        (a.save / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
