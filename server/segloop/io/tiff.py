"""TIFF / BigTIFF / OME-TIFF (tiled or striped, pyramidal) through tifffile's zarr store,
and the whole-slide formats tifffile reads the same way: Aperio SVS, Hamamatsu NDPI,
Leica SCN, Ventana BIF (JPEG / JPEG 2000 tiles; pixel size from the vendor metadata)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from xml.etree import ElementTree

import tifffile
import zarr
from tifffile.tifffile import svs_description_metadata

from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.pixel_size import from_ppi, um_per_unit
from segloop.io.source import ImageSource, Mpp, file_fingerprint, stream_fingerprint
from segloop.io.tiff_level import TiffLevel

#: TIFF ResolutionUnit (inch, centimetre, millimetre, micrometre) → units per inch
_PER_INCH = {2: 1.0, 3: 2.54, 4: 25.4, 5: 25400.0}


def _xml_attr(xml: str, tag: str) -> dict[str, str] | None:
    """Attributes of the first element named ``tag`` (any namespace), or None."""
    for el in ElementTree.fromstring(xml).iter():
        if el.tag.rsplit("}", 1)[-1] == tag:
            return el.attrib
    return None


def _ome_mpp(tif: tifffile.TiffFile) -> Mpp | None:
    """OME-XML ``Pixels`` PhysicalSizeY/X (+ unit, default µm) of the first image."""
    px = _xml_attr(tif.ome_metadata, "Pixels") or {}
    sizes = [
        um_per_unit(px.get(f"PhysicalSize{a}Unit", "µm"), px.get(f"PhysicalSize{a}")) for a in "YX"
    ]
    return (sizes[0], sizes[1]) if all(sizes) else None


def _scn_mpp(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> Mpp | None:
    """Leica SCN: the image's ``view`` size (nm) over its full-resolution pixel size."""
    for image in ElementTree.fromstring(tif.scn_metadata).iter():
        if image.tag.endswith("}image") and image.attrib.get("name") == series.name:
            view = next(e for e in image if e.tag.endswith("}view")).attrib
            pixels = next(e for e in image if e.tag.endswith("}pixels")).attrib
            return (
                float(view["sizeY"]) / 1e3 / int(pixels["sizeY"]),
                float(view["sizeX"]) / 1e3 / int(pixels["sizeX"]),
            )
    return None


def _page_mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> Mpp | None:
    """Vendor metadata of the level-0 page, else its XResolution/YResolution tags."""
    if tif.is_svs:  # Aperio: "…|MPP = 0.2520|…" in ImageDescription
        mpp = svs_description_metadata(page.description).get("MPP")
        if mpp:
            return float(mpp), float(mpp)
    if tif.is_bif:  # Ventana: <iScan … ScanRes="0.2325"> in the first IFD's XMP tag
        xmp = tif.pages.first.tags.valueof(700)
        scan = _xml_attr(xmp.decode() if isinstance(xmp, bytes) else xmp, "iScan") or {}
        if scan.get("ScanRes"):
            return float(scan["ScanRes"]), float(scan["ScanRes"])
    unit = int(page.resolutionunit)
    rx, ry = page.resolution
    if unit not in _PER_INCH or min(rx, ry) <= 0:  # NDPI writes centimetres
        return None
    return from_ppi(ry * _PER_INCH[unit], rx * _PER_INCH[unit])


def tiff_mpp(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> Mpp | None:
    """µm/px (y, x) of ``series``' level 0 from whichever metadata the file carries."""
    try:
        if tif.is_ome:
            return _ome_mpp(tif)
        if tif.is_scn:
            return _scn_mpp(tif, series)
        return _page_mpp(tif, series.levels[0].keyframe)
    except (ValueError, KeyError, StopIteration, ElementTree.ParseError):
        return None  # unreadable metadata: unknown, like none at all


def _main_series(tif: tifffile.TiffFile) -> int:
    """Series 0, except in Leica SCN files, which may list the slide overview (macro)
    first: there the image with the most pixels."""
    if not tif.is_scn:
        return 0
    return max(range(len(tif.series)), key=lambda i: math.prod(tif.series[i].shape))


def _direct(loc: Location, level: tifffile.TiffPageSeries) -> TiffLevel | None:
    """The level read by ``TiffLevel`` (a local file, one page holding the level's
    pixels), or None: tifffile's zarr store reads it (remote files, multi-page levels)."""
    page = level.pages[0] if len(level.pages) == 1 else None
    if not loc.local or not TiffLevel.readable(page) or tuple(level.shape) != page.shape:
        return None
    return TiffLevel(loc.path, page)


def open_tiff(path: Path | Location) -> ImageSource:
    """Level 0 of the first series. Checks that every tile/strip lies inside the file,
    so a truncated file or a header claiming a huge image fails before any work. A
    local single-page level is read by ``TiffLevel``; other levels and remote files
    (fsspec: one open handle, by byte ranges) through tifffile's zarr store."""
    loc = Location.of(path)
    try:
        if loc.local:
            source, size = loc.path, loc.path.stat().st_size
        else:
            source, size = loc.fs.open(loc.url, "rb"), loc.fs.size(loc.url)
        with tifffile.TiffFile(source) as tif:
            index = _main_series(tif)
            series = tif.series[index]
            level = series.levels[0]
            axes = level.axes
            mpp = tiff_mpp(tif, series)
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
            arrays = [_direct(loc, lv) for lv in series.levels]
        if any(a is None for a in arrays):
            if not loc.local:
                source.seek(0)  # tifffile takes a stream's position as the file's start
            # maxworkers > 1: tifffile decodes chunks in worker threads (imagecodecs
            # releases the GIL); with 1 it would decode on zarr's single event-loop thread.
            # One store holds every level (arrays "0", "1", …) over one file handle.
            store = tifffile.imread(
                source,
                aszarr=True,
                series=index,
                level=None,
                multiscales=True,
                maxworkers=max(2, os.cpu_count() or 2),
            )
            group = zarr.open_group(store, mode="r")
            arrays = [group[str(k)] if a is None else a for k, a in enumerate(arrays)]
        if loc.local:
            fingerprint = file_fingerprint(loc.path)
        else:
            with loc.fs.open(loc.url, "rb") as f:
                fingerprint = stream_fingerprint(f, size)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    return ImageSource(arrays[0], axes, path, fingerprint, arrays[1:], mpp)
