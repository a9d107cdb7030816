"""TIFF / BigTIFF / OME-TIFF (tiled or striped, pyramidal) through tifffile's zarr store."""

from __future__ import annotations

import math
import os
from pathlib import Path

import tifffile
import zarr

from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.source import ImageSource, file_fingerprint, stream_fingerprint


def open_tiff(path: Path | Location) -> ImageSource:
    """Level 0 of the first series. Checks that every tile/strip lies inside the file,
    so a truncated file or a header claiming a huge image fails before any work. A
    remote file (fsspec) is read through one open handle, by byte ranges."""
    loc = Location.of(path)
    try:
        if loc.local:
            source, size = loc.path, loc.path.stat().st_size
        else:
            source, size = loc.fs.open(loc.url, "rb"), loc.fs.size(loc.url)
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            level = series.levels[0]
            axes = level.axes
            levels = len(series.levels)
            pages = level.pages
            for page in pages[: min(len(pages), 4096)]:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                expected = math.prod(page.chunked)
                if len(page.dataoffsets) < expected:
                    raise UserError(
                        f"{path}: corrupt TIFF (header claims {page.shape[0]}×{page.shape[1]} "
                        f"pixels in {expected} tiles/strips but lists {len(page.dataoffsets)}); "
                        "re-copy or re-export it"
                    )
                ends = [
                    o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n
                ]
                if ends and max(ends) > size:
                    raise UserError(
                        f"{path}: truncated or corrupt TIFF (image data runs past the end of "
                        f"the {size}-byte file); re-copy or re-export it"
                    )
        if not loc.local:
            source.seek(0)  # tifffile takes a stream's position as the file's start
        # maxworkers > 1: tifffile decodes chunks in worker threads (imagecodecs releases
        # the GIL); with 1 it would decode on zarr's single event-loop thread
        store = tifffile.imread(
            source, aszarr=True, series=0, level=0, maxworkers=max(2, os.cpu_count() or 2)
        )
        array = zarr.open_array(store, mode="r")
        if loc.local:
            fingerprint = file_fingerprint(loc.path)
        else:
            with loc.fs.open(loc.url, "rb") as f:
                fingerprint = stream_fingerprint(f, size)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    return ImageSource(array, axes, path, fingerprint, levels)
