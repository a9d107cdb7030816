"""``segment`` and ``segment-batch``: images → OME-Zarr stores."""

from __future__ import annotations

import argparse
import contextlib
import sys

from segloop.cli.common import Progress, common, emit_json, format_stats, info, path_or_url
from segloop.errors import UserError


def _segment_options(args: argparse.Namespace):
    from segloop.io.location import parse_storage_options
    from segloop.pipeline.segment import SegmentOptions
    from segloop.runtimes import device_options

    opts = SegmentOptions(
        runtime=args.runtime,
        model=args.model,
        tile=args.tile,
        shard=args.shard,
        window=args.window,
        batch=args.batch,
        copy_image=args.copy_image,
        mpp=args.mpp,
        write_workers=args.writers,
        write_processes=args.writer_processes,
        overwrite=args.overwrite,
        storage_options=parse_storage_options(args.storage_options),
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
            info(
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
            info(
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
    info(
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
            info(args, f"{row['image']}: {row['status']} {row['error']}".rstrip())

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
    sp.add_argument("--url", help="triton: gRPC HOST:PORT[,HOST:PORT…] (default localhost:8001)")
    sp.add_argument(
        "--triton-shm",
        choices=["auto", "system", "none"],
        default="auto",
        help="triton: system shared memory (auto = when the server is local)",
    )
    sp.add_argument(
        "--model",
        help="a model name in the repository (segloop models) or an ONNX file "
        "(default: the newest segloop_unet)",
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
    sp.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        help="the image's level-0 pixel size in µm/px, overriding its metadata (default: "
        "from the file); the slide is segmented at the pyramid level nearest the model's "
        "µm/px, resampled when still more than 10 %% off",
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``segment-batch``."""
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
