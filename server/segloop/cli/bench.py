"""``bench …``: benchmarks that compare side by side in one run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from segloop.cli.common import common, info, parse_size


def _bench(args: argparse.Namespace, run, **options) -> int:
    """Run one benchmark with the shared options; print its result as JSON."""
    result = run(
        tile=args.tile,
        batch=args.batch,
        threads=args.threads,
        save=args.save,
        log=lambda s: info(args, s),
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


def bench_common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--tile", type=int, default=512)
    sp.add_argument("--batch", type=int, default=4)
    sp.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    sp.add_argument("--save", type=Path, help="folder for JSON + markdown results")
    common(sp)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench segment|triton|serve|dask|memory``."""
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

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
