"""``segment-batch``: many slides into one folder, a summary row per slide.

Finished stores are skipped (``already-complete``), unfinished ones resume, and a slide
that fails (unreadable, corrupt) is reported in the summary while the others go on.
With a Dask cluster, ``concurrency`` slides are in flight at once (their bands share the
workers); without one, slides run one after another with all local cores, on one
runtime (the model loaded once).
"""

from __future__ import annotations

import glob
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from segloop.errors import UserError
from segloop.io.location import Location, is_url
from segloop.pipeline.job import job_runtime
from segloop.pipeline.segment import SegmentOptions, segment
from segloop.runtimes import Runtime

SUMMARY = "segloop-batch.tsv"
COLUMNS = ("image", "mpx", "seconds", "mpx_s", "status", "error")


def list_inputs(spec: str) -> list[Path | str]:
    """A text file with one path or URL per line (blank lines and ``#`` comments
    skipped) or a local glob pattern."""
    p = Path(spec)
    if p.is_file() and p.suffix == ".txt":
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        paths = [ln if is_url(ln) else Path(ln) for ln in lines if ln and not ln.startswith("#")]
    else:
        paths = [Path(m) for m in sorted(glob.glob(spec))]
    if not paths:
        raise UserError(f"{spec}: no images (give a .txt list or a glob such as 'slides/*.tif')")
    return paths


def store_name(image: Path | str) -> str:
    """``slides/a.ome.tif`` (or ``s3://b/slides/a.ome.tif``) → ``a.zarr``."""
    name = str(image).rstrip("/").rsplit("/", 1)[-1]
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".png", ".jpg"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] + ".zarr"
    return name.rsplit(".", 1)[0] + ".zarr"


def _one(
    image: Path | str, out_dir: Location, opts: SegmentOptions, cluster, runtime: Runtime | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"image": str(image), "mpx": None, "mpx_s": None, "error": ""}
    try:
        out = (
            out_dir.path / store_name(image)
            if out_dir.local
            else Location(f"{out_dir.url}/{store_name(image)}", out_dir.options)
        )
        summary = segment(image, out, opts, cluster=cluster, runtime=runtime)
        h, w = summary["params"]["source"]["shape"]
        row.update(mpx=round(h * w / 1e6, 1), status=summary["status"])
    except UserError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # a broken slide must not stop the batch; say what happened
        row.update(status="error", error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    if row["status"] == "complete" and row["seconds"] > 0:
        row["mpx_s"] = round(row["mpx"] / row["seconds"], 3)
    return row


def run_batch(
    images: list[Path | str],
    out_dir: Path | str,
    opts: SegmentOptions,
    cluster=None,
    concurrency: int = 2,
    on_row=None,
) -> list[dict[str, Any]]:
    """Segment every image into ``out_dir/<name>.zarr``; rows in input order, also written
    to ``out_dir/segloop-batch.tsv``."""
    names = [store_name(i) for i in images]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"several inputs would write {dupes[0]}; rename them or split the batch")
    # without a cluster the slides run one after another on one runtime: the model loads
    # and its runtime fills its memory once, not per slide (a cluster's workers keep
    # theirs); made first, so a model that cannot load leaves no output folder behind
    runtime = job_runtime(opts) if cluster is None else None
    try:
        out_dir = Location.of(out_dir, opts.storage_options)
        if not out_dir.exists():
            out_dir.makedirs()
        workers = max(1, concurrency) if cluster is not None else 1
        with ThreadPoolExecutor(workers, thread_name_prefix="segloop-batch") as pool:
            futures = [pool.submit(_one, i, out_dir, opts, cluster, runtime) for i in images]
            rows = []
            for f in futures:
                rows.append(f.result())
                if on_row:
                    on_row(rows[-1])
    finally:
        if runtime is not None:
            runtime.close()
    lines = ["\t".join(COLUMNS)] + [
        "\t".join("" if r[c] is None else str(r[c]).replace("\t", " ") for c in COLUMNS)
        for r in rows
    ]
    out_dir.write_bytes(SUMMARY, ("\n".join(lines) + "\n").encode())
    return rows
