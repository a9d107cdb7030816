"""``synth`` and ``demo``: a synthetic slide, and the whole job on it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from segloop.cli.common import Progress, common, emit_json, format_stats, info, parse_size
from segloop.cli.review import SERVE_PORT
from segloop.errors import UserError


def synthesize(
    out: Path,
    truth: Path | None,
    size: tuple[int, int],
    *,
    seed: int = 0,
    stain: str = "he",
    compression: str = "jpeg",
    overwrite: bool = False,
    as_json: bool = False,
    quiet: bool = False,
) -> None:
    """Write a synthetic slide ``out`` (OME-TIFF, ``size`` = (h, w) px) and, if given,
    its ground-truth classes ``truth``; via ``.partial`` files, so nothing half-written
    is left under the final names."""
    from segloop.synth import write_ome_tiff

    for p in (out, truth):
        if p is not None and p.exists() and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
    h, w = size
    tmp = out.with_name(out.name + ".partial")
    tmp_truth = truth.with_name(truth.name + ".partial") if truth else None
    with Progress("synth", as_json, quiet) as prog:
        done = [0]

        def step(n: int) -> None:
            done[0] = min(h * w, done[0] + n)
            prog(done[0], h * w)

        try:
            write_ome_tiff(
                tmp,
                h,
                w,
                seed=seed,
                stain=stain,
                truth_path=tmp_truth,
                tile=512,
                compression=compression,
                progress=step,
            )
        except OSError as exc:
            for p in (tmp, tmp_truth):
                if p is not None:
                    p.unlink(missing_ok=True)
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from exc
    os.replace(tmp, out)
    if tmp_truth is not None and truth is not None:
        os.replace(tmp_truth, truth)


def cmd_synth(args: argparse.Namespace) -> int:
    synthesize(
        args.output,
        args.truth,
        args.size,
        seed=args.seed,
        stain=args.stain,
        compression=args.compression,
        overwrite=args.overwrite,
        as_json=args.json,
        quiet=args.quiet,
    )
    h, w = args.size
    if args.json:
        emit_json(
            {
                "event": "done",
                "output": str(args.output),
                "truth": str(args.truth or ""),
                "shape": [h, w],
            }
        )
    else:
        info(args, f"wrote {args.output} ({h}×{w}, stain {args.stain}, seed {args.seed})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import tifffile
    import zarr

    from segloop.pipeline.segment import SegmentOptions, segment
    from segloop.scores import iou

    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    h, w = args.size
    slide, truth = out / f"slide_{h}x{w}.ome.tif", out / f"slide_{h}x{w}_truth.tif"
    if not (slide.exists() and truth.exists()):
        synthesize(slide, truth, (h, w), seed=7, overwrite=True, quiet=args.quiet)
    else:
        info(args, f"using {slide}")
    store = out / f"slide_{h}x{w}.zarr"
    with Progress("segment", False, args.quiet) as prog:
        summary = segment(slide, store, SegmentOptions(), progress=prog)
    if summary["status"] == "already-complete":
        info(args, f"{store} is already complete")
    elif not args.quiet:
        print(format_stats(summary["stats"]), file=sys.stderr)
    # score a central crop against the ground truth
    n = min(h, w, 2048)
    y0, x0 = (h - n) // 2, (w - n) // 2
    pred = zarr.open_array(store / "labels/segmentation/0", mode="r")[y0 : y0 + n, x0 : x0 + n]
    gt = zarr.open_array(tifffile.imread(truth, aszarr=True), mode="r")[y0 : y0 + n, x0 : x0 + n]
    scores = iou(np.asarray(pred), np.asarray(gt))
    info(
        args,
        f"IoU vs ground truth ({n}² central crop): "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
    )
    segloop = _segloop_command()
    print(
        f"\nThe OME-Zarr store is {store}\n"
        f"  review it later:   {segloop} serve {store}"
        + ("   (or: make serve)" if store == Path("demo/slide_8192x8192.zarr") else "")
        + "\n"
        f"  open it in napari: {_shown(sys.executable)} -m pip install 'napari[all]' "
        f"napari-ome-zarr (not installed by segloop), then napari --plugin napari-ome-zarr "
        f"{store}\n"
        f"  in Python:         zarr.open_group('{store}') / ome_zarr.reader",
        file=sys.stderr,
    )
    if args.no_serve:
        return 0
    return _serve_demo(store, args.port)


def cmd_warm_up(args: argparse.Namespace) -> int:
    """Compile numba's kernels into its cache now: a 1024² synthetic slide segmented with
    the shipped model (reader, pre, post, pyramid, uncertainty and the synth renderer),
    then the review server's rasterisers. Otherwise the first job and the first server
    start after an install compile them (measured: 9–14 s and 9–17 s, once)."""
    import tempfile
    import time

    import numba

    from segloop.pipeline.segment import SegmentOptions, segment
    from segloop.review import raster

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segloop-warm-up-") as d:
        slide = Path(d) / "slide.ome.tif"
        synthesize(slide, None, (1024, 1024), seed=1, quiet=True)
        segment(slide, Path(d) / "slide.zarr", SegmentOptions())
    raster.warm_up()
    where = numba.config.CACHE_DIR or "__pycache__ beside each kernel's source"
    info(args, f"numba's kernels compiled in {time.perf_counter() - t0:.0f} s, cached in {where}")
    return 0


def _shown(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it (for hints)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _segloop_command() -> str:
    """How to call segloop as this process was called: ``segloop`` when that is on PATH,
    else its path (``.venv/bin/segloop``), else ``python -m segloop``."""
    import shutil

    exe = Path(sys.argv[0])
    if exe.name != "segloop":
        return f"{_shown(sys.executable)} -m segloop"
    found = shutil.which("segloop")
    return "segloop" if found and Path(found).resolve() == exe.resolve() else _shown(str(exe))


def _serve_demo(store: Path, port: int) -> int:
    """Serve the demo store on loopback and print one login URL; Ctrl-C stops it."""
    from segloop.review.app import run
    from segloop.review.db import ReviewDB

    host = "127.0.0.1"
    db = ReviewDB(store)
    users = db.users()
    token = db.add_user(f"demo-{len(users) + 1}", "admin") if users else None
    db.close()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if token:  # a re-run: the first start's login was printed then; a new one for this run
        log(f"log in with http://{host}:{port}/?token={token}")
    log("Ctrl-C stops the server")
    run([store], host, port, log=log)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``synth``, ``demo`` and ``warm-up``."""
    s = sub.add_parser("synth", help="generate a synthetic H&E-like OME-TIFF with ground truth")
    s.add_argument("output", type=Path)
    s.add_argument("--size", type=parse_size, default=(4096, 4096), help="N or HxW")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stain",
        choices=["he", "shifted", "mixed"],
        default="he",
        help="shifted: out-of-distribution colours; mixed: shifted patches",
    )
    s.add_argument("--truth", type=Path, help="also write ground-truth classes (TIFF)")
    s.add_argument("--compression", choices=["jpeg", "zlib", "lzw", "zstd", "none"], default="jpeg")
    s.add_argument("--overwrite", action="store_true")
    common(s)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser(
        "demo", help="generate a slide, segment it, score it, then serve it for review"
    )
    s.add_argument("--size", type=parse_size, default=(8192, 8192), help="N or HxW")
    s.add_argument("--dir", type=Path, default=Path("demo"), help="folder for slide and store")
    s.add_argument("--port", type=int, default=SERVE_PORT, help="review server port")
    s.add_argument("--no-serve", action="store_true", help="stop after scoring (for scripts)")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "warm-up",
        help="compile numba's kernels into its cache now (make install does), "
        "instead of in the first job and the first server start",
    )
    common(s, json_flag=False)
    s.set_defaults(func=cmd_warm_up)
