"""``segloop`` command line. User errors print one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from segloop.errors import UserError

EXIT_USER_ERROR = 2


def parse_size(text: str) -> tuple[int, int]:
    """'8192' or '1500x1300' (height × width) → (h, w)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW with N > 0")
    return parts[0], parts[1]


class Progress:
    """Rich progress bar on stderr (Mpx/s, ETA), or JSON lines on stdout with ``--json``."""

    def __init__(self, label: str, as_json: bool, quiet: bool) -> None:
        self.label, self.as_json, self.quiet = label, as_json, quiet
        self._bar = None
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._start_px: int | None = None

    def __enter__(self) -> Progress:
        return self

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("Mpx"),
            TextColumn("{task.fields[rate]:.2f} Mpx/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_stderr_console(),
        )
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=None, rate=0.0)

    def __call__(self, done: int, total: int) -> None:
        if self._start_px is None:
            self._start_px = done
            if not (self.as_json or self.quiet):
                self._start_bar()
        elapsed = time.perf_counter() - self._t0
        rate = (done - self._start_px) / 1e6 / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=done // 10**6, total=total // 10**6, rate=rate)
        elif self.as_json and (done == total or time.perf_counter() - self._last > 0.5):
            self._last = time.perf_counter()
            eta = (total - done) / 1e6 / rate if rate > 0 else None
            emit_json(
                {
                    "event": "progress",
                    "stage": self.label,
                    "done_px": done,
                    "total_px": total,
                    "mpx_s": round(rate, 3),
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            if exc_type is not None:  # an error message follows: leave only that line
                self._bar.live.transient = True
            self._bar.stop()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _info(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or getattr(args, "json", False)):
        print(text, file=sys.stderr)


# --- commands ---------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from segloop.synth import write_ome_tiff

    out: Path = args.output
    for p in (out, args.truth):
        if p is not None and p.exists() and not args.overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
    h, w = args.size
    tmp = out.with_name(out.name + ".partial")
    tmp_truth = args.truth.with_name(args.truth.name + ".partial") if args.truth else None
    with Progress("synth", args.json, args.quiet) as prog:
        done = [0]

        def step(n: int) -> None:
            done[0] = min(h * w, done[0] + n)
            prog(done[0], h * w)

        try:
            write_ome_tiff(
                tmp,
                h,
                w,
                seed=args.seed,
                stain=args.stain,
                truth_path=tmp_truth,
                tile=512,
                compression=args.compression,
                progress=step,
            )
        except OSError as exc:
            for p in (tmp, tmp_truth):
                if p is not None:
                    p.unlink(missing_ok=True)
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from exc
    os.replace(tmp, out)
    if tmp_truth is not None:
        os.replace(tmp_truth, args.truth)
    if args.json:
        emit_json(
            {"event": "done", "output": str(out), "truth": str(args.truth or ""), "shape": [h, w]}
        )
    else:
        _info(args, f"wrote {out} ({h}×{w}, stain {args.stain}, seed {args.seed})")
    return 0


def path_or_url(text: str) -> Path | str:
    """A local path, or an fsspec URL kept as text (``Path`` would fold ``s3://``)."""
    from segloop.io.location import is_url

    return text if is_url(text) else Path(text)


def _segment_options(args: argparse.Namespace):
    from segloop.io.location import OPTIONS_ENV, storage_options
    from segloop.pipeline.segment import SegmentOptions
    from segloop.runtimes import device_options

    if args.storage_options:  # read by every Location, in this process and its workers
        os.environ[OPTIONS_ENV] = args.storage_options
        storage_options()  # fail early on bad JSON

    opts = SegmentOptions(
        runtime=args.runtime,
        model=args.model,
        tile=args.tile,
        shard=args.shard,
        window=args.window,
        batch=args.batch,
        copy_image=args.copy_image,
        write_workers=args.writers,
        write_processes=args.writer_processes,
        overwrite=args.overwrite,
    )
    if args.runtime == "triton":
        opts.runtime_options = {"url": args.url or "localhost:8001", "shm": args.triton_shm}
    elif args.url:
        raise UserError("--url is for --runtime triton")
    if args.device != "cpu":
        opts.runtime_options = device_options(args.runtime, args.device)
        opts.device = args.device
    if args.threads:
        opts.threads = args.threads
    elif args.dask and args.dask.startswith("local:"):  # share the cores between workers
        n = args.dask.removeprefix("local:")
        opts.threads = max(1, opts.threads // int(n)) if n.isdigit() and int(n) else 1
    elif args.dask:
        opts.threads = 1  # unknown workers: one runtime thread per worker thread
    if any(v is not None and v < 1 for v in (opts.batch, opts.threads, opts.write_workers)):
        raise UserError("--batch, --threads and --writers must be at least 1")
    return opts


@contextlib.contextmanager
def _cluster(scheduler: str | None):
    """A Dask client for ``--dask`` (closed after), or None."""
    if not scheduler:
        yield None
        return
    from segloop.pipeline.cluster import connect

    client = connect(scheduler)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and scheduler.startswith("local:"):
            cluster.close()


def cmd_segment(args: argparse.Namespace) -> int:
    from segloop.pipeline.segment import resegment, segment

    opts = _segment_options(args)
    if args.only == "unreviewed":
        if args.dask:
            raise UserError("--only unreviewed runs on this machine; drop --dask")
        if args.overwrite:
            raise UserError("--only unreviewed keeps the store; it cannot be used with --overwrite")
        with Progress("re-segment", args.json, args.quiet) as prog:
            summary = resegment(args.input, args.output, opts, progress=prog)
        stats = summary["stats"]
        if args.json:
            emit_json({"event": "done", **summary})
        else:
            _info(
                args,
                f"re-segmented {len(summary['tiles'])} unreviewed tiles of {args.output} with "
                f"model v{summary['model']['version']}; kept "
                f"{len(summary['kept_human_tiles'])} human-reviewed tiles "
                f"({stats['wall_s']:.1f} s)",
            )
            if args.stats:
                print(format_stats(stats), file=sys.stderr)
        return 0
    with _cluster(args.dask) as client, Progress("segment", args.json, args.quiet) as prog:
        summary = segment(args.input, args.output, opts, progress=prog, cluster=client)
    if summary["status"] == "already-complete":
        if args.json:
            emit_json({"event": "done", "status": "already-complete", "output": str(args.output)})
        else:
            _info(
                args,
                f"{args.output} is already complete; nothing to do "
                "(pass --overwrite to segment again)",
            )
        return 0
    stats = summary["stats"]
    if args.json:
        emit_json(
            {"event": "done", "status": "complete", "output": str(args.output), "stats": stats}
        )
        return 0
    _info(
        args,
        f"wrote {args.output}: {stats['pixels'] / 1e6:.1f} Mpx in "
        f"{stats['wall_s']:.1f} s ({stats['mpx_s']} Mpx/s)",
    )
    if args.stats:
        print(format_stats(stats), file=sys.stderr)
    return 0


def cmd_segment_batch(args: argparse.Namespace) -> int:
    from segloop.pipeline.batch import COLUMNS, SUMMARY, list_inputs, run_batch

    images = list_inputs(args.inputs)
    opts = _segment_options(args)

    def on_row(row: dict) -> None:
        if args.json:
            emit_json({"event": "image", **row})
        else:
            _info(args, f"{row['image']}: {row['status']} {row['error']}".rstrip())

    with _cluster(args.dask) as client:
        rows = run_batch(images, args.output, opts, client, args.concurrency, on_row)
    failed = [r for r in rows if r["status"] == "error"]
    if args.json:
        emit_json({"event": "done", "images": len(rows), "failed": len(failed)})
    elif not args.quiet:
        from rich.console import Console
        from rich.table import Table

        table = Table(*COLUMNS, title=f"{args.output}/{SUMMARY}")
        for r in rows:
            table.add_row(*("" if r[c] is None else str(r[c]) for c in COLUMNS))
        Console(stderr=True).print(table)
    return 1 if failed else 0


def format_stats(stats: dict) -> str:
    """Stage table: busy, waiting for input, waiting for the next stage (seconds)."""
    wall = stats["wall_s"]
    lines = [
        f"{'stage':<8}{'busy s':>9}{'busy %':>8}{'wait in s':>11}{'wait out s':>12}{'items':>7}"
    ]
    for name, s in stats["stages"].items():
        pct = 100 * s["busy_s"] / wall if wall else 0
        lines.append(
            f"{name:<8}{s['busy_s']:>9.2f}{pct:>7.0f}%{s['wait_in_s']:>11.2f}"
            f"{s['wait_out_s']:>12.2f}{s['items']:>7}"
        )
    lines.append(
        f"wall {wall:.2f} s, {stats['mpx_s']} Mpx/s, {stats['threads']} threads, "
        f"batch {stats['batch']}"
    )
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from segloop.model.card import model_card, write_card_markdown
    from segloop.model.train import export_onnx, train

    out: Path = args.output
    if (out / "model.onnx").exists() and not args.overwrite:
        raise UserError(f"{out}/model.onnx exists; pass --overwrite or choose another folder")
    model, info = train(
        steps=args.steps, batch=args.batch, seed=args.seed, log=lambda s: _info(args, s)
    )
    card = model_card(model, info, version=args.version)
    export_onnx(model, out / "model.onnx", card)
    write_card_markdown(card, out / "MODEL_CARD.md")
    _info(args, f"wrote {out}/model.onnx; held-out IoU {info['held_out_iou']}")
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
        ns = argparse.Namespace(
            output=slide,
            truth=truth,
            size=(h, w),
            seed=7,
            stain="he",
            compression="jpeg",
            overwrite=True,
            json=False,
            quiet=args.quiet,
        )
        cmd_synth(ns)
    else:
        _info(args, f"using {slide}")
    store = out / f"slide_{h}x{w}.zarr"
    with Progress("segment", False, args.quiet) as prog:
        summary = segment(slide, store, SegmentOptions(), progress=prog)
    if summary["status"] == "already-complete":
        _info(args, f"{store} is already complete")
    else:
        print(format_stats(summary["stats"]), file=sys.stderr)
    # score a central crop against the ground truth
    n = min(h, w, 2048)
    y0, x0 = (h - n) // 2, (w - n) // 2
    pred = zarr.open_array(store / "labels/segmentation/0", mode="r")[y0 : y0 + n, x0 : x0 + n]
    gt = zarr.open_array(tifffile.imread(truth, aszarr=True), mode="r")[y0 : y0 + n, x0 : x0 + n]
    scores = iou(np.asarray(pred), np.asarray(gt))
    _info(
        args,
        f"IoU vs ground truth ({n}² central crop): "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
    )
    print(
        f"\nDone. The OME-Zarr store is {store}\n"
        f"  review it:           segloop serve {store}   (browser UI; prints a login URL)\n"
        f"  open it in napari:   napari --plugin napari-ome-zarr {store}\n"
        f"  or in Python:        ome_zarr.reader / zarr.open_group('{store}')"
    )
    return 0


def _bench(args: argparse.Namespace, run, **options) -> int:
    """Run one benchmark with the shared options; print its result as JSON."""
    result = run(
        tile=args.tile,
        batch=args.batch,
        threads=args.threads,
        save=args.save,
        log=lambda s: _info(args, s),
        **options,
    )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_bench_segment(args: argparse.Namespace) -> int:
    from segloop.bench.segment import run_bench

    return _bench(
        args,
        run_bench,
        size=args.size[0],
        runtime=args.runtime,
        device=args.device,
        rss=not args.no_rss,
    )


def cmd_bench_dask(args: argparse.Namespace) -> int:
    from segloop.bench.cluster import run_dask_bench

    return _bench(args, run_dask_bench, size=args.size[0], shard=args.shard)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from segloop.bench.segment import run_memory

    return _bench(args, run_memory, sizes=args.sizes, monai_sizes=args.monai_sizes)


def cmd_bench_triton(args: argparse.Namespace) -> int:
    from segloop.bench.triton import run_triton_bench

    return _bench(args, run_triton_bench, size=args.size[0], shm=args.triton_shm)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from segloop.bench.serve import run_serve_bench

    return _bench(
        args,
        run_serve_bench,
        size=args.size[0],
        clients=args.clients,
        large_image=args.vs_large_image,
        rounds=args.rounds,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from segloop.review.app import run

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    run(
        args.stores,
        args.host,
        args.port,
        log=log,
        tile_pack=not args.no_tile_pack,
        images=args.image,
    )
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from segloop.review.app import open_stores
    from segloop.review.db import ROLES, ReviewDB

    open_stores([args.store])
    db = ReviewDB(args.store)
    try:
        if args.action == "add":
            if not args.name or args.role not in ROLES:
                raise UserError(f"users add needs NAME and --role {'|'.join(ROLES)}")
            if any(u["name"] == args.name for u in db.users()):
                raise UserError(f"user {args.name!r} exists; revoke it first or pick another")
            token = db.add_user(args.name, args.role)
            _info(args, f"added {args.name} ({args.role}); bearer token:")
            print(token)
        elif args.action == "list":
            for u in db.users():
                state = "revoked" if u["revoked"] else "active"
                print(f"{u['name']}\t{u['role']}\t{state}")
        else:
            if not args.name or not db.revoke(args.name):
                raise UserError(f"no active user {args.name!r}")
            _info(args, f"revoked {args.name}")
    finally:
        db.close()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """One line per problem on stdout; exit 1 if any, 0 if the store is intact."""
    from segloop.review.check import check_store

    report = check_store(args.store)
    for line in report.problems:
        print(f"{args.store}: {line}")
    for line in report.notes:
        _info(args, f"note: {line}")
    verdict = f"{len(report.problems)} problems" if report.problems else "intact"
    _info(args, f"{args.store}: {verdict} ({report.arrays} arrays, {report.shards} shards read)")
    return 1 if report.problems else 0


def cmd_export_corrections(args: argparse.Namespace) -> int:
    from segloop.review.export import export_corrections

    since = None
    if args.since:
        try:
            since = float(args.since)
        except ValueError:
            try:
                since = datetime.fromisoformat(args.since).timestamp()
            except ValueError:
                raise UserError(
                    f"--since {args.since!r}: give an ISO date/time (2026-11-25T10:00) "
                    "or Unix seconds"
                ) from None
    index = export_corrections(
        args.store, args.output, args.approved_only, since, overwrite=args.overwrite
    )
    items = index["items"]
    if args.json:
        emit_json({"event": "done", "output": str(args.output), "tiles": len(items)})
    else:
        _info(
            args,
            f"wrote {len(items)} tiles to {args.output} "
            f"({sum(i['changed_px'] for i in items)} changed pixels)",
        )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from segloop.model.finetune import finetune, publish
    from segloop.pipeline.segment import default_model

    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if not 0 <= args.replay < 1:
        raise UserError("--replay must be in [0, 1)")
    if not 0 < args.lr < 1:
        raise UserError("--lr must be in (0, 1)")
    model_path = args.model or default_model()
    repository = args.repository or model_path.parents[2]
    model, info = finetune(
        model_path,
        args.corrections,
        epochs=args.epochs,
        replay=args.replay,
        lr=args.lr,
        seed=args.seed,
        log=lambda s: _info(args, s),
    )
    onnx_path = publish(model, info, repository)
    version = int(onnx_path.parent.name)
    if args.triton:
        from segloop.triton.server import load_version

        load_version(args.triton, "segloop_unet", version)
        _info(args, f"{args.triton}: segloop_unet v{version} loaded")
    if args.json:
        emit_json(
            {
                "event": "done",
                "model": str(onnx_path),
                "version": version,
                "before": info["before"],
                "after": info["after"],
            }
        )
    else:
        _info(args, f"wrote {onnx_path} (v{version}); after: {info['after']}")
    return 0


def cmd_triton_serve(args: argparse.Namespace) -> int:
    from segloop.assets import model_repository
    from segloop.triton.server import ServerOptions, serve

    opts = ServerOptions(
        model_repository=args.model_repository or model_repository(),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        explicit=args.model_control_mode == "explicit",
        load=args.load_model or ["segloop"],
        log_verbose=args.log_verbose,
        host=args.host,
        config_name=args.model_config_name,
    )
    return serve(opts, log=lambda s: _info(args, s))


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, json_flag: bool = True) -> None:
        sp.add_argument("--quiet", action="store_true", help="no progress or info output")
        if json_flag:
            sp.add_argument(
                "--json",
                action="store_true",
                help="one JSON object per progress event and a final summary",
            )

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

    def segment_args(sp: argparse.ArgumentParser) -> None:
        """Options shared by segment and segment-batch."""
        sp.add_argument("--runtime", default="onnx", help="onnx (default), torch or triton")
        sp.add_argument(
            "--device",
            choices=["cpu", "cuda", "sim"],
            default="cpu",
            help="torch: cuda = the device-resident pipeline, float16 on the GPU (not run on "
            "this project's machines yet); sim = the same pipeline in numba's CUDA "
            "simulator (NUMBA_ENABLE_CUDASIM=1; CI rehearsal, slow)",
        )
        sp.add_argument(
            "--url", help="triton: gRPC HOST:PORT[,HOST:PORT…] (default localhost:8001)"
        )
        sp.add_argument(
            "--triton-shm",
            choices=["auto", "system", "none"],
            default="auto",
            help="triton: system shared memory (auto = when the server is local)",
        )
        sp.add_argument(
            "--model", type=Path, help="ONNX model (default: newest in model_repository)"
        )
        sp.add_argument("--tile", type=int, default=512, help="tile core = output chunk side")
        sp.add_argument(
            "--shard",
            type=int,
            help="shard side (px, multiple of --tile): the unit of writing and resume",
        )
        sp.add_argument(
            "--window",
            type=int,
            help="inference window core (px, multiple of the model's downsampling factor; "
            "default: one window per shard, so the halo is paid once per shard)",
        )
        sp.add_argument(
            "--batch",
            type=int,
            help="windows per inference call (default: as many as make ≈ 1.5 Mpx)",
        )
        sp.add_argument(
            "--copy-image",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="copy the image pyramid into the store (a self-contained store); default: "
            "only when the input is not a tiled pyramidal TIFF/OME-Zarr, which viewers read "
            "in place",
        )
        sp.add_argument("--threads", type=int, help="runtime threads (default: all cores)")
        sp.add_argument("--writers", type=int, help="writers, one shard each (default: all cores)")
        sp.add_argument(
            "--writer-processes",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="writers as processes (default: for jobs of 8 shards or more; else threads)",
        )
        sp.add_argument("--overwrite", action="store_true", help="replace existing stores")
        sp.add_argument(
            "--dask",
            metavar="SCHEDULER",
            help="segment on a Dask cluster: tcp://HOST:8786, or local:N worker processes",
        )
        sp.add_argument(
            "--storage-options",
            metavar="JSON",
            help='fsspec options for s3://… inputs/outputs, e.g. \'{"endpoint_url": "…"}\' '
            "(credentials: the usual AWS_* environment variables)",
        )

    s = sub.add_parser("segment", help="segment an image into an OME-Zarr store")
    s.add_argument(
        "input", type=path_or_url, help="TIFF/OME-TIFF, OME-Zarr/zarr, PNG or JPEG (or s3://…)"
    )
    s.add_argument(
        "-o", "--output", type=path_or_url, required=True, help="output .zarr store (or s3://…)"
    )
    segment_args(s)
    s.add_argument(
        "--only",
        choices=["unreviewed"],
        help="re-segment the existing store's tiles that no human edited or accepted "
        "(with --model, e.g. a fine-tuned version); human work is kept",
    )
    s.add_argument("--stats", action="store_true", help="print per-stage busy/wait times")
    common(s)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser(
        "segment-batch", help="segment many images into a folder, with a summary table"
    )
    s.add_argument("inputs", help="a .txt file with one image per line, or a glob ('*.tif')")
    s.add_argument(
        "-o", "--output", type=path_or_url, required=True, help="folder for the stores (or s3://…)"
    )
    segment_args(s)
    s.add_argument(
        "--concurrency", type=int, default=2, help="with --dask: images in flight at once"
    )
    common(s)
    s.set_defaults(func=cmd_segment_batch)

    s = sub.add_parser("train", help="train the UNet on synthetic data and export ONNX")
    s.add_argument("output", type=Path, help="version folder, e.g. model_repository/segloop_unet/2")
    s.add_argument("--steps", type=int, default=700)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--version", type=int, default=1)
    s.add_argument("--overwrite", action="store_true")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="generate an image, segment it, say how to open it")
    s.add_argument("--size", type=parse_size, default=(8192, 8192))
    s.add_argument("--dir", type=Path, default=Path("demo"))
    common(s, json_flag=False)
    s.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    def bench_common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tile", type=int, default=512)
        sp.add_argument("--batch", type=int, default=4)
        sp.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
        sp.add_argument("--save", type=Path, help="folder for JSON + markdown results")
        common(sp)

    sizes = lambda t: [int(v) for v in t.split(",") if v]  # noqa: E731
    s = b.add_parser("segment", help="end-to-end vs model-only vs MONAI, one run")
    s.add_argument("--size", type=parse_size, default=(4096, 4096))
    s.add_argument("--runtime", default="onnx")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch: cuda")
    s.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    bench_common(s)
    s.set_defaults(func=cmd_bench_segment, batch=None)  # segloop's own default batch
    s = b.add_parser("triton", help="Triton ensemble vs embedded runtime, one run")
    s.add_argument("--size", type=parse_size, default=(2048, 2048))
    s.add_argument("--triton-shm", choices=["auto", "system", "none"], default="auto")
    bench_common(s)
    s.set_defaults(func=cmd_bench_triton)
    s = b.add_parser("serve", help="review-server tile and edit latency (loopback)")
    s.add_argument("--size", type=parse_size, default=(4096, 4096))
    s.add_argument("--clients", type=int, default=32)
    s.add_argument(
        "--vs-large-image",
        metavar="PYTHON",
        help="python of a venv with large-image[tiff]: serve the image side by side with it",
    )
    s.add_argument("--rounds", type=int, default=2, help="A/B rounds against large_image")
    bench_common(s)
    s.set_defaults(func=cmd_bench_serve)
    s = b.add_parser("dask", help="LocalCluster with 1 vs 2 worker processes, one run")
    s.add_argument("--size", type=parse_size, default=(4096, 4096))
    s.add_argument("--shard", type=int, default=512, help="one task per row of shards")
    bench_common(s)
    s.set_defaults(func=cmd_bench_dask, threads=1)

    s = b.add_parser("memory", help="peak RSS of segloop and MONAI by image size")
    s.add_argument("--sizes", type=sizes, default=[10000, 40000], help="segloop, e.g. 10000,40000")
    s.add_argument("--monai-sizes", type=sizes, default=[4096, 8192], help="MONAI sizes")
    bench_common(s)
    s.set_defaults(func=cmd_bench_memory)
    s = sub.add_parser("serve", help="review server for one or more stores (browser + API)")
    s.add_argument("stores", type=Path, nargs="+")
    s.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--no-tile-pack",
        action="store_true",
        help="do not encode the tiles ahead into the tile pack ($SEGLOOP_CACHE/tile-packs/)",
    )
    s.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="the input a store reads its image from, moved since `segloop segment` (checked "
        "by fingerprint, then kept in the store's segloop.json); once per store, in order",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("users", help="review-server users: add, list, revoke")
    s.add_argument("action", choices=["add", "list", "revoke"])
    s.add_argument("name", nargs="?")
    s.add_argument("--role", choices=["viewer", "annotator", "reviewer", "admin"])
    s.add_argument("--store", type=Path, required=True, help="the store whose users to manage")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_users)

    s = sub.add_parser(
        "check", help="full integrity check of a store: database, zarr metadata, every chunk"
    )
    s.add_argument("store", type=Path, help="a segloop store")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "export-corrections", help="reviewed tiles of a store → training pairs (npz + index)"
    )
    s.add_argument("store", type=Path, help="a reviewed segloop store")
    s.add_argument("output", type=Path, help="folder for index.json + tiles/*.npz")
    s.add_argument(
        "--approved-only",
        action="store_true",
        help="only tiles a reviewer accepted/corrected with no pending annotator proposal",
    )
    s.add_argument("--since", help="only tiles changed since (ISO date/time or Unix seconds)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing export")
    common(s)
    s.set_defaults(func=cmd_export_corrections)

    s = sub.add_parser("finetune", help="fine-tune on exported corrections → next model version")
    s.add_argument("--model", type=Path, help="ONNX to start from (default: newest version)")
    s.add_argument("--corrections", type=Path, required=True, help="export-corrections folder")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument(
        "--replay", type=float, default=0.75, help="share of synthetic in-distribution patches"
    )
    s.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (one-cycle)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repository", type=Path, help="model repository (default: the --model's own)")
    s.add_argument("--triton", metavar="URL", help="then load it on this Triton (gRPC HOST:PORT)")
    common(s)
    s.set_defaults(func=cmd_finetune)

    t = sub.add_parser("triton", help="Triton Inference Server").add_subparsers(
        dest="triton", required=True
    )
    s = t.add_parser("serve", help="run tritonserver on the model repository until Ctrl-C")
    s.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="default: the repository shipped with segloop",
    )
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        default="none",
        help="explicit: load/unload models (new versions) through the API",
    )
    s.add_argument(
        "--load-model",
        action="append",
        default=None,
        help="explicit mode: model to load at start (default: segloop)",
    )
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address HTTP, gRPC and metrics bind to (default: loopback only; 0.0.0.0 = all)",
    )
    s.add_argument(
        "--model-config-name",
        help="each model's configs/NAME.pbtxt instead of config.pbtxt (e.g. gpu)",
    )
    common(s, json_flag=False)
    s.set_defaults(func=cmd_triton_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # tifffile logs what it finds wrong in a damaged file before raising; the reader turns
    # that into our one-line error, so the log lines would only repeat it as noise
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"segloop: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("segloop: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
