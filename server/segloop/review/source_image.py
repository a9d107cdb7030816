"""The image layer of a store, read by chunk at any pyramid level, wherever it lives.

``segloop.json`` says where (``"image"``): ``{"mode": "copy"}`` (or no key: an older
store) — the store's own arrays ``0/ 1/ …``; ``{"mode": "source", "path", "fingerprint",
"levels"}`` — the input, read in place (TIFF / OME-TIFF sub-resolutions, OME-Zarr
datasets). Store level k is ``ceil(h / 2^k) × ceil(w / 2^k)``; where the source has no
level of exactly that shape, the chunk is computed from the nearest finer level that has
one (level 0 always does) by repeated 2×2 mean (``downsample_mean``, the rounding of the
copy), reading only the region under the chunk.

JPEG pass-through: a source level that is JPEG-compressed in tiles of exactly the store's
tile size, whose tiles a standard decoder (Pillow's libjpeg, as browsers') turns into the
same pixels as the TIFF reader, gives each full chunk's tile bytes as they are in the
file (with the level's ``JPEGTables`` spliced in), read by ``TiffLevel.raw``: no decode, no
encode. The check decodes one tile both ways at open (so an RGB-coded JPEG without the
Adobe marker, which browsers would read as YCbCr, is never passed through).

One reader for everything that reads a store's image: the review server, the tile pack,
``export-corrections``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segloop.errors import UserError
from segloop.io.formats import TIFF_MAGIC, open_image
from segloop.io.location import Location, is_url
from segloop.io.ome_zarr import StoreLock, array_path, read_record, write_record
from segloop.io.source import ImageSource
from segloop.io.tiff_level import TiffLevel
from segloop.kernels.pyramid import downsample_mean

JPEG = 7  # TIFF compression tag value
#: largest per-channel difference allowed between Pillow's and the TIFF reader's decode of
#: the probe tile (two libjpeg builds may round the IDCT / upsampling differently by 1–2;
#: a wrong colour space differs by tens)
PROBE_TOLERANCE = 3

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in the level's pixels


def image_mode(record: dict[str, Any]) -> dict[str, Any]:
    """The record's ``"image"`` entry; stores without one hold a copy."""
    return record.get("image") or {"mode": "copy"}


def relocate_hint(store: Path | str) -> str:
    return f"give its new place with `segloop serve --image PATH {store}`"


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of every store level: ``ceil(h / 2^k) × ceil(w / 2^k)``."""
    return [(-(-height // (1 << k)), -(-width // (1 << k))) for k in range(levels)]


def verify_source(store: Path | str, image: dict[str, Any], path: str | None = None) -> ImageSource:
    """Open the source of a source-mode store (at ``path``, else the recorded one) and
    check its fingerprint: ``UserError`` (one line naming ``--image``) when it is missing,
    unreadable or not the image the store was segmented from."""
    where = path or image["path"]
    try:
        src = open_image(where)
    except UserError as exc:
        raise UserError(
            f"{store}: its image is read from {where}, which cannot be opened ({exc}); "
            + relocate_hint(store)
        ) from None
    if src.fingerprint != image["fingerprint"]:
        raise UserError(
            f"{store}: {where} is not the image the store was segmented from (changed or "
            f"replaced: fingerprint {src.fingerprint[:12]}, expected "
            f"{image['fingerprint'][:12]}); refusing to serve other pixels: " + relocate_hint(store)
        )
    return src


def relocate(store: Path, path: str, log=print) -> None:
    """Point a source-mode store at its moved input (``segloop serve --image PATH``): the
    fingerprint must match; the run record then names the new place (atomic replace)."""
    record = read_record(store)
    if record is None:
        return  # not a store: ``open_stores`` says so
    image = image_mode(record)
    if image["mode"] != "source":
        raise UserError(
            f"{store} holds its own copy of the image; --image is for stores that read "
            "the image from their input"
        )
    where = path if is_url(path) else str(Path(path).resolve())
    verify_source(store, image, where)
    if where != image["path"]:
        with StoreLock(store):
            write_record(store, {**record, "image": {**image, "path": where}})
        log(f"{store.name}: the image is now read from {where}")


@dataclass
class _Level:
    """One level of the source: (h, w), its reader, and for a local TIFF level in JPEG
    tiles of the store's tile size, the ``TiffLevel`` whose tile bytes pass through."""

    shape: tuple[int, int]
    reader: ImageSource
    tiles: TiffLevel | None = None
    jpeg: bool = False  # pass-through verified


class StoreImage:
    """``read(level, box)`` → (C, h, w) in the source dtype, for a copy or a source.

    ``jpeg(level, cy, cx)``: the chunk's JPEG bytes as stored in the source, or None
    (not a pass-through level, or an edge chunk narrower than the tile). Thread-safe.
    """

    def __init__(
        self,
        store: Path,
        record: dict[str, Any],
        shape: tuple[int, int],
        source: ImageSource | None = None,
    ) -> None:
        """``shape``: the store's level-0 (h, w); ``source``: an already verified source."""
        grid = record["grid"]
        self.store, self.tile, self.levels = store, int(grid["tile"]), int(grid["levels"])
        self.shard = int(grid["shard"])
        self.shapes = level_shapes(*shape, self.levels)
        self.image = image_mode(record)
        self.mode: str = self.image["mode"]
        # store level k ← (the store level j ≤ k a source level matches, that level)
        self._plan: list[tuple[int, _Level]] = []  # source mode only
        if self.mode == "copy":
            root = zarr.open_group(store, mode="r")
            self._arrays = [root[array_path("image", k)] for k in range(self.levels)]
            self.channels = int(self._arrays[0].shape[0])
            self.dtype = np.dtype(self._arrays[0].dtype)
            return
        src = source or verify_source(store, self.image)
        if src.shape != self.shapes[0]:
            raise UserError(
                f"{store}: its image {self.image['path']} is {src.shape[0]}×{src.shape[1]}, "
                f"the store {self.shapes[0][0]}×{self.shapes[0][1]}; " + relocate_hint(store)
            )
        self.channels, self.dtype = src.channels, src.dtype
        path = str(src.path)
        found = self._tiff_levels(src) if _is_tiff(path) else self._zarr_levels(path, src)
        for k in range(self.levels):
            j = next(j for j in range(k, -1, -1) if self.shapes[j] in found)
            self._plan.append((j, found[self.shapes[j]]))
        for k, (j, lv) in enumerate(self._plan):
            if j == k and lv.tiles is not None and not lv.jpeg:
                lv.jpeg = self._probe(k, lv)

    # --- opening the source's levels ---------------------------------------------------

    def _tiff_levels(self, src: ImageSource) -> dict[tuple[int, int], _Level]:
        out: dict[tuple[int, int], _Level] = {}
        for i in range(src.pyramid_levels):
            reader = src.pyramid_level(i)
            level = _Level(reader.shape, reader)
            tl = reader.tiff_level  # local files only: remote ones have no pass-through
            if (
                tl is not None
                and tl.compression == JPEG
                and tl.tiled
                and tl.chunks[:2] == (self.tile, self.tile)
                and tl.dtype == np.uint8
                and reader.channels in (1, 3)
            ):
                level.tiles = tl
            out.setdefault(level.shape, level)
        return out

    def _zarr_levels(self, path: str, src: ImageSource) -> dict[tuple[int, int], _Level]:
        out = {src.shape: _Level(src.shape, src)}
        loc = Location(path)
        node = zarr.open(loc.zarr_store(read_only=True), mode="r")
        if not isinstance(node, zarr.Group):
            return out
        attrs = dict(node.attrs)
        ms = (attrs.get("ome", attrs).get("multiscales") or [None])[0]
        if not ms:
            return out
        axes = "".join(a if isinstance(a, str) else a["name"] for a in ms["axes"])
        for ds in ms["datasets"][1:]:
            reader = ImageSource(node[ds["path"]], axes, Path(str(path)), src.fingerprint)
            out.setdefault(reader.shape, _Level(reader.shape, reader))
        return out

    # --- reading -----------------------------------------------------------------------

    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` = (y0, y1, x0, x1) at store ``level`` → (C, y1-y0, x1-x0)."""
        y0, y1, x0, x1 = box
        if self.mode == "copy":
            return self._arrays[level][:, y0:y1, x0:x1]
        j, lv = self._plan[level]
        d = level - j
        h, w = self.shapes[j]
        region = lv.reader.read(y0 << d, min(h, y1 << d), x0 << d, min(w, x1 << d))
        out = np.moveaxis(region, -1, 0)
        for _ in range(d):
            out = downsample_mean(np.ascontiguousarray(out))
        return np.ascontiguousarray(out[:, : y1 - y0, : x1 - x0])

    def chunk_box(self, level: int, cy: int, cx: int) -> Box:
        h, w = self.shapes[level]
        t = self.tile
        return cy * t, min(h, (cy + 1) * t), cx * t, min(w, (cx + 1) * t)

    def written(self, level: int, cy: int, cx: int) -> bool:
        """Whether the chunk holds pixels (a copy's shard file never written: all zero)."""
        if self.mode != "copy":
            return True
        per = self.shard // self.tile
        key = ("0", str(cy // per), str(cx // per))
        return (self.store / array_path("image", level) / "c").joinpath(*key).exists()

    def passthrough(self, level: int, cy: int, cx: int) -> bool:
        """Whether ``jpeg`` answers this chunk (cheap: no I/O)."""
        if self.mode == "copy":
            return False
        j, lv = self._plan[level]
        if j != level or not lv.jpeg:
            return False
        y0, y1, x0, x1 = self.chunk_box(level, cy, cx)
        return y1 - y0 == x1 - x0 == self.tile and lv.tiles.stored(cy, cx)

    def jpeg(self, level: int, cy: int, cx: int) -> bytes | None:
        """The chunk's JPEG stream from the source file (tables spliced in), or None."""
        if not self.passthrough(level, cy, cx):
            return None
        return self._stream(self._plan[level][1], cy, cx)

    @staticmethod
    def _stream(lv: _Level, cy: int, cx: int) -> bytes:
        assert lv.tiles is not None
        data, tables = lv.tiles.raw(cy, cx), lv.tiles.jpegtables
        if tables and len(tables) > 4:  # tables: SOI … EOI; tile: SOI … EOI
            return tables[:-2] + data[2:]
        return data

    def _probe(self, level: int, lv: _Level) -> bool:
        """Decode one full tile from its bytes (Pillow) and through the reader: the same
        pixels (within ``PROBE_TOLERANCE``) or no pass-through for this level."""
        from PIL import Image

        h, w = lv.shape
        if h < self.tile or w < self.tile or lv.tiles is None or not lv.tiles.stored(0, 0):
            return False
        try:
            with Image.open(io.BytesIO(self._stream(lv, 0, 0))) as im:
                im.load()
                mode = "L" if self.channels == 1 else "RGB"
                if im.size != (self.tile, self.tile) or im.mode != mode:
                    return False
                got = np.asarray(im).reshape(self.tile, self.tile, -1)
        except Exception:
            return False
        want = lv.reader.read(0, self.tile, 0, self.tile)
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        return bool(diff.max() <= PROBE_TOLERANCE)

    def close(self) -> None:
        """Close the source files read in place (pass-through descriptors)."""
        for _, lv in self._plan:
            if lv.tiles is not None:
                lv.tiles.close()


def _is_tiff(path: str) -> bool:
    """A local file or object that starts with the TIFF magic (else: a zarr store)."""
    loc = Location(path)
    if loc.local:
        if not loc.path.is_file():
            return False
        with loc.path.open("rb") as f:
            return f.read(4) in TIFF_MAGIC
    if any(loc.exists(m) for m in ("zarr.json", ".zarray", ".zgroup")):
        return False
    with loc.fs.open(loc.url, "rb") as f:
        return f.read(4) in TIFF_MAGIC
