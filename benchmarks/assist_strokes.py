"""Strokes the copilot saves on the benchmark slide (``segloop synth``, same seed as
``ui_latency.py``), against its ground truth.

Task: every nucleus of the slide (a ground-truth component of class nucleus, ≥ 20 px)
must end up with a mask of IoU ≥ 0.8 against the truth. Two starting points: from scratch
(an empty mask: annotation) and from the model's mask (correction: only the nuclei the
model itself got below 0.8 need work). Costs, in user actions:

- by hand: a polygon traced around the nucleus, one click per corner of its contour
  simplified to 1 px (``skimage.measure.approximate_polygon``);
- with the copilot: one click at the nucleus (+ Enter), and one slider move for each
  threshold tried after the first (0.5, then 0.3, 0.7, 0.9); a nucleus no threshold
  gets to 0.8 costs that plus the polygon.

The proposals are computed by the server's own function (``segloop.review.assist``) on
the segmented store, no browser; their compute time is recorded.

``python benchmarks/assist_strokes.py [--size 2048]`` writes
``benchmarks/results/assist_strokes_<size>_cpu<N>.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from segloop.bench.segment import machine
from segloop.review.assist import propose, region
from segloop.review.image import ReviewImage

ROOT = Path(__file__).resolve().parents[1]
NUCLEUS = 2
THRESHOLDS = (0.5, 0.3, 0.7, 0.9)  # the slider's default first
GOOD = 0.8


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "segloop", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def polygon_clicks(obj: np.ndarray) -> int:
    """Corners of the object's outer contour simplified to 1 px (≥ 3)."""
    contour = max(find_contours(np.pad(obj, 1).astype(float), 0.5), key=len)
    return max(3, len(approximate_polygon(contour, tolerance=1.0)) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segloop-assist-bench-"))
    slide, truth_path, store = tmp / "slide.ome.tif", tmp / "truth.tif", tmp / "slide.zarr"
    cli("synth", str(slide), "--size", str(args.size), "--truth", str(truth_path), "--quiet")
    cli("segment", str(slide), "-o", str(store), "--quiet")
    truth = tifffile.imread(truth_path) == NUCLEUS
    img = ReviewImage(store, "slide")
    h, w = img.shape
    labels_now = functools.partial(img.read_chunk, "segmentation", 0)
    try:
        parts = ndimage.label(truth, structure=np.ones((3, 3)))[0]
        boxes = ndimage.find_objects(parts)
        rows, ms = [], []
        for k, sl in enumerate(boxes, start=1):
            obj = parts[sl] == k
            if obj.sum() < 20:
                continue
            ys, xs = np.nonzero(obj)
            i = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
            seed = (int(xs[i] + sl[1].start), int(ys[i] + sl[0].start))
            pad = 16  # the object's box with a margin: what its IoU is measured on
            y0, x0 = max(0, sl[0].start - pad), max(0, sl[1].start - pad)
            y1, x1 = min(h, sl[0].stop + pad), min(w, sl[1].stop + pad)
            target = parts[y0:y1, x0:x1] == k
            seg = region(img, labels_now, y0, y1, x0, x1) == NUCLEUS
            pred = _component(seg, seed[1] - y0, seed[0] - x0)
            model_iou = iou(pred, target)
            reached = None
            for tries, t in enumerate(THRESHOLDS):
                t0 = time.perf_counter()
                py, px, mask = propose(img, [seed], NUCLEUS, t)
                ms.append(1000 * (time.perf_counter() - t0))
                got = np.zeros_like(target)
                mh, mw = mask.shape
                a, b = max(py, y0), min(py + mh, y1)
                c, d = max(px, x0), min(px + mw, x1)
                got[a - y0 : b - y0, c - x0 : d - x0] = mask[a - py : b - py, c - px : d - px] > 0
                if iou(got, target) >= GOOD:
                    reached = (t, iou(got, target), 1 + tries)  # click (+ slider moves)
                    break
            manual = polygon_clicks(obj)
            cost = reached[2] if reached else 1 + len(THRESHOLDS) - 1 + manual
            rows.append({"px": int(obj.sum()), "model_iou": round(model_iou, 3), "manual": manual,
                         "assist": cost, "threshold": reached and reached[0]})  # fmt: skip
    finally:
        img.close()
        shutil.rmtree(tmp)
    needs = [r for r in rows if r["model_iou"] < GOOD]

    def totals(rs: list[dict]) -> dict:
        solved = [r for r in rs if r["threshold"] is not None]
        return {
            "nuclei": len(rs),
            "manual_clicks": sum(r["manual"] for r in rs),
            "assist_actions": sum(r["assist"] for r in rs),
            "solved_by_copilot": len(solved),
            "one_click": sum(1 for r in solved if r["assist"] == 1),
        }

    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "size": args.size,
        "good_iou": GOOD,
        "thresholds": THRESHOLDS,
        "from_scratch": totals(rows),
        "correction": totals(needs),
        "proposal_ms": {
            "p50": round(float(np.median(ms)), 1),
            "p90": round(float(np.percentile(ms, 90)), 1),
            "n": len(ms),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"assist_strokes_{args.size}_cpu{result['machine']['cores']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Copilot strokes saved, {args.size}² benchmark slide ({result['date']})", "",
             "| task | nuclei | by hand (clicks) | with the copilot (actions) | saved |"
             " solved by the copilot (1 click) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("from_scratch", "correction"):
        t = result[name]
        saved = 1 - t["assist_actions"] / max(1, t["manual_clicks"])
        lines.append(f"| {name.replace('_', ' ')} | {t['nuclei']} | {t['manual_clicks']} | "
                     f"{t['assist_actions']} | {saved:.0%} | {t['solved_by_copilot']} "
                     f"({t['one_click']}) |")  # fmt: skip
    p = result["proposal_ms"]
    m = result["machine"]
    lines += ["", f"Proposal compute (server side, {p['n']} proposals): p50 {p['p50']} ms, "
              f"p90 {p['p90']} ms. Machine: {m['cpu']}, {m['cores']} cores."]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _component(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """The 8-connected component of ``mask`` at (y, x), or the largest one in the box when
    the model has no nucleus there."""
    parts, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    k = parts[y, x] or 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    return parts == k


if __name__ == "__main__":
    main()
